"""``apply --trainer oltr``: two-stage OLTR with the frozen CMW-Net, and the open-set evaluation of both trainers.

Stage 1 is the ERM trainer on the backbone's own linear classifier (same data, weighting, seeds: for equal
epochs it reproduces an ERM run). Stage 2 computes the visual memory (class means of the training features,
eval mode, no augmentation), starts the hallucinator from the stage-1 classifier (as the official code), and
trains backbone (lr x ``oltr_backbone_lr_mult``) + modulated attention + meta-embedding head (lr) with the
CMW-weighted CE of the meta-embedding logits plus ``dcl_weight`` x the discriminative centroid loss, drawing
batches class-aware (``samples_per_class`` of one class at a time) unless ``oltr_sampler="uniform"``.
The frozen net weights the classification loss in both stages, with the families of the target's class counts.

The memory is a buffer of exact class means (set at the start of stage 2 and, with ``recompute_centroids``, at
every stage-2 epoch). The official code makes it a parameter that the centroid loss moves towards the features
at lr 0.01 x weight 0.01 with a gradient divided by the batch size, i.e. slowly; a buffer of exact means keeps
DDP and resume simple, and ``recompute_centroids`` follows the features when wanted.

Open set: a sample whose reachability ``s / min_i |v - c_i|`` falls below a threshold is rejected as unknown.
ERM and OLTR stage 1 use the class means of their training features as ``c``; stage 2 its memory.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from cmw_transfer.errors import UserError
from cmw_transfer.metrics.openset import calibrated_threshold, open_set_report
from cmw_transfer.models.oltr import (
    ModulatedAttention,
    OLTRModel,
    check_backbone,
    features_and_logits,
    reachability,
)
from cmw_transfer.trainer.apply import ApplyConfig, ApplyStepper, ERMTrainer, RunSetup, _autocast, sync_buffers
from cmw_transfer.trainer.common import (
    DistributedContext,
    EpochLoader,
    _default_collate,
    _seed_worker,
    derive_seed,
    make_loader,
)


# -- the open set -------------------------------------------------------------------------------------------------
def parse_open_classes(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"9"`` or ``"7,8,9"`` -> ``(7, 8, 9)``; the CLI form of ``--open-classes``."""
    if text is None or text == "":
        return ()
    if not isinstance(text, str):
        return tuple(int(c) for c in text)
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise UserError(f"--open-classes '{text}': expected class indices like 9 or 7,8,9") from None


def _relabel(ds: Any, remap: np.ndarray, known: list[int]) -> Any:
    view = copy.copy(ds)
    view.num_classes = len(known)
    view.targets = remap[ds.targets]
    view.clean_targets = None if ds.clean_targets is None else remap[ds.clean_targets]
    if ds.classes is not None:
        view.classes = [ds.classes[c] for c in known]
    return view


def as_unknown(ds: Any, num_known: int) -> Any:
    """Every sample of ``ds`` labelled ``num_known`` ("unknown"), whatever its own label."""
    view = copy.copy(ds)
    view.num_classes = num_known + 1
    view.targets = np.full(len(ds), num_known, dtype=np.int64)
    view.clean_targets = None
    view.classes = None
    return view


def hold_out_classes(train_ds: Any, eval_sets: list[tuple[str, Any]],
                     classes: Sequence[int]) -> tuple[Any, list[tuple[str, Any]], Any]:
    """Known classes renumbered 0..K-1 everywhere; the held-out classes' test samples become the open set.

    Training samples whose observed *or* true label is held out are dropped: an open class must stay unseen.
    """
    c = int(train_ds.num_classes)
    held = sorted(set(int(k) for k in classes))
    bad = [k for k in held if not 0 <= k < c]
    if bad:
        raise UserError(f"--open-classes {bad}: the training set has classes 0..{c - 1}")
    known = [k for k in range(c) if k not in held]
    if len(known) < 2:
        raise UserError(f"--open-classes leaves {len(known)} known class(es); a classifier needs at least 2")
    remap = np.full(c, -1, dtype=np.int64)
    remap[known] = np.arange(len(known))
    keep = np.isin(train_ds.targets, known)
    if train_ds.clean_targets is not None:
        keep &= np.isin(train_ds.clean_targets, known)
    train = _relabel(train_ds.subset(np.flatnonzero(keep)), remap, known)
    evals, open_ds = [], None
    for label, ds in eval_sets:
        evals.append((label, _relabel(ds.subset(np.flatnonzero(np.isin(ds.targets, known))), remap, known)))
        if label == "test":
            open_ds = as_unknown(ds.subset(np.flatnonzero(np.isin(ds.targets, held))), len(known))
    if open_ds is None or not len(open_ds):
        raise UserError(f"--open-classes {held}: the test split has no samples of those classes")
    return train, evals, open_ds


def _load_open_dataset(cfg: ApplyConfig, spec: str) -> Any:
    from cmw_transfer.dataset import create_dataset, resolve_source

    base, _ = resolve_source(spec)
    same = base == resolve_source(cfg.dataset)[0]
    transform = None
    if cfg.img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        transform = make_transform("val", cfg.img_size)
    try:
        return create_dataset(base, cfg.data_root if same else None, "open" if base == "imagenet-lt" else "test",
                              transform=transform, seed=cfg.seed, strict=cfg.strict)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(f"--open-dataset {spec}: {exc}") from None


def prepare_open_set(cfg: ApplyConfig, train_ds: Any,
                     eval_sets: list[tuple[str, Any]]) -> tuple[Any, list[tuple[str, Any]], Any | None]:
    """The open set of a run: held-out classes, ``--open-dataset`` (every sample unknown), or ImageNet-LT's
    ``open`` split when its list file exists. Returns (train, eval sets, open set labelled ``num_classes``)."""
    if cfg.open_classes:
        return hold_out_classes(train_ds, eval_sets, parse_open_classes(cfg.open_classes))
    spec = cfg.open_dataset
    if not spec:
        from cmw_transfer.dataset import resolve_source
        from cmw_transfer.dataset.formats.imagenet_lt import list_file

        if resolve_source(cfg.dataset)[0] != "imagenet-lt" or cfg.data_root is None:
            return train_ds, eval_sets, None
        try:
            list_file(Path(cfg.data_root).expanduser(), "open")
        except UserError:  # no ImageNet_LT_open.txt: closed-set evaluation only
            return train_ds, eval_sets, None
        spec = "imagenet-lt"
    return train_ds, eval_sets, as_unknown(_load_open_dataset(cfg, spec), int(train_ds.num_classes))


# -- centroids ----------------------------------------------------------------------------------------------------
def train_eval_view(ds: Any, cfg: ApplyConfig) -> Any:
    """The training samples without augmentation (centroids are class means of clean, deterministic features)."""
    view = copy.copy(ds)
    if cfg.img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        view.transform = make_transform("val", cfg.img_size)
    else:
        view.transform = None  # in-memory: the plain tensor; files: the default eval transform of the split
        view.split = "val"
    return view


def train_view_loader(s: RunSetup) -> Any:
    """Sharded, unshuffled, unaugmented pass over the training set (centroids)."""
    return make_loader(train_eval_view(s.train_ds, s.cfg), s.cfg.batch_size, train=False, workers=s.cfg.workers,
                       seed=s.cfg.seed, distributed=s.ctx.enabled)


@torch.no_grad()
def class_centroids(features: Callable[[torch.Tensor], torch.Tensor], loader: Any, ctx: DistributedContext,
                    num_classes: int, amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of ``features(x)`` over ``loader``: ``([C, D] float32, counts [C])``.

    Exact under DDP: each rank sums its shard (float64) and the sums and counts are all-reduced. A class without
    samples gets the mean of all features (a harmless memory slot; reachability ignores such classes).
    """
    device = ctx.device
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for batch in loader:
        if batch is None or batch[1].numel() == 0:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            v = features(x)
        v = v.double()
        if sums is None:
            sums = torch.zeros(num_classes, v.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, y, v)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    dims = [d for d in ctx.all_gather_object(None if sums is None else sums.shape[1]) if d is not None]
    if not dims:
        raise UserError("no readable training image to compute class centroids from")
    if sums is None:  # this rank's shard was empty
        sums = torch.zeros(num_classes, dims[0], dtype=torch.float64, device=device)
    total = ctx.all_reduce_sum(sums.cpu())
    n = ctx.all_reduce_sum(counts.cpu())
    centroids = total / n.clamp_min(1.0)[:, None]
    if (n == 0).any() and n.sum() > 0:
        centroids[n == 0] = total.sum(0) / n.sum()
    return centroids.float(), n


# -- stage-2 sampling ---------------------------------------------------------------------------------------------
class ClassAwareSampler(Sampler[int]):
    """OLTR's stage-2 class-aware sampling: ``per_class`` samples of one class at a time, classes in shuffled rounds.

    Every class with samples is visited equally often and cycles through its own shuffled samples, so a tail
    class repeats its few images. An epoch is as long as the training set (the official epoch). The order is a
    function of (seed, epoch) only, identical on every rank; rank r takes every world_size-th index.
    """

    def __init__(self, labels: np.ndarray, per_class: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels)
        self.pools = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.per_class, self.seed, self.rank, self.world = int(per_class), int(seed), int(rank), int(world_size)
        self.total = math.ceil(labels.size / self.world) * self.world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The epoch's global index order (before sharding)."""
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, 0x0C1A55))
        shuffled = [rng.permutation(p) for p in self.pools]
        pos = [0] * len(self.pools)
        out: list[int] = []
        while len(out) < self.total:
            for c in rng.permutation(len(self.pools)):
                for _ in range(self.per_class):
                    if pos[c] == len(shuffled[c]):
                        shuffled[c], pos[c] = rng.permutation(self.pools[c]), 0
                    out.append(int(shuffled[c][pos[c]]))
                    pos[c] += 1
                if len(out) >= self.total:
                    break
        return np.asarray(out[: self.total], dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.rank:: self.world].tolist())

    def __len__(self) -> int:
        return self.total // self.world


def class_aware_loader(ds: Any, cfg: ApplyConfig, ctx: DistributedContext) -> EpochLoader:
    """``make_loader``'s conventions (epoch-seeded workers, drop_last) with the class-aware sampler."""
    sampler = ClassAwareSampler(ds.targets, cfg.samples_per_class, seed=cfg.seed, rank=ctx.rank,
                                world_size=ctx.world_size)
    return EpochLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                       collate_fn=_default_collate(), pin_memory=torch.cuda.is_available(),
                       drop_last=len(sampler) >= cfg.batch_size, worker_init_fn=_seed_worker,
                       generator=torch.Generator(), persistent_workers=False,
                       base_seed=derive_seed(cfg.seed, ctx.rank))


# -- stage-2 optimisation -----------------------------------------------------------------------------------------
def stage2_optimizer(model: OLTRModel, cfg: ApplyConfig, steps_per_epoch: int,
                     epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    """Head (and attention) at ``lr``, backbone at ``lr x oltr_backbone_lr_mult``; the head's groups come first, so
    ``param_groups[0]`` carries the head lr. Same optimizer and schedule kind as stage 1, over stage-2 epochs."""
    import timm.optim
    import timm.scheduler

    groups = []
    for module, lr in ((model.head, cfg.lr), (model.attention, cfg.lr),
                       (model.backbone, cfg.lr * cfg.oltr_backbone_lr_mult)):
        if module is None:
            continue
        for group in timm.optim.param_groups_weight_decay(module, cfg.weight_decay):
            if group["params"]:
                groups.append({**group, "lr": lr})
    optimizer = timm.optim.create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               momentum=cfg.momentum)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=epochs, warmup_epochs=0, min_lr=0.0,
        decay_milestones=[max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))], decay_rate=0.1,
        step_on_epochs=False, updates_per_epoch=max(1, steps_per_epoch))
    return optimizer, scheduler


class OLTRStepper(ApplyStepper):
    """Stage 2: (CMW-weighted) CE of the meta-embedding logits + ``dcl_weight`` x the centroid loss (unweighted)."""

    def __init__(self, *args: Any, dcl_weight: float, **kwargs: Any) -> None:
        self.dcl_weight = float(dcl_weight)
        super().__init__(*args, **kwargs)

    def reset_stats(self) -> None:
        super().reset_stats()
        self.dcl_stats = torch.zeros(2, dtype=torch.float64, device=self.device)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, dcl = self.model(x, y)
        with torch.no_grad():
            self.dcl_stats[0] += dcl.detach().double() * y.shape[0]
            self.dcl_stats[1] += y.shape[0]
        return logits, self.dcl_weight * dcl.float()

    def epoch_stats(self, ctx: DistributedContext) -> dict[str, Any]:
        out = super().epoch_stats(ctx)
        s = ctx.all_reduce_sum(self.dcl_stats.cpu()).numpy()
        out["train_dcl"] = float(s[0] / max(s[1], 1.0))
        return out


# -- the trainer --------------------------------------------------------------------------------------------------
class OLTRTrainer(ERMTrainer):
    """Stage 1 = ERM on the backbone; at epoch ``stage1_epochs`` switch to the meta-embedding (stage 2).

    The checkpoint holds the stage, the whole :class:`OLTRModel` (memory included) and the current stage's
    optimizer and schedule, so ``--resume`` continues either stage (or starts stage 2) exactly.
    """

    model: OLTRModel

    def __init__(self, s: RunSetup) -> None:
        self.stage1_epochs, self.stage2_epochs = s.cfg.stage_epochs()
        self.stage = 1
        super().__init__(s)

    def build_model(self) -> OLTRModel:
        cfg = self.s.cfg
        backbone = super().build_model()
        check_backbone(backbone, cfg.model)
        return OLTRModel(backbone, self.s.num_classes, attention=self._attention(backbone),
                         cosine_scale=cfg.cosine_scale, reachability_scale=cfg.reachability_scale,
                         dcl_margin=cfg.dcl_margin, dcl_push_weight=cfg.dcl_push_weight)

    def _attention(self, backbone: nn.Module) -> ModulatedAttention | None:
        """Modulated attention for a channel-first 4-D feature map (auto), sized by one dry forward."""
        wanted = self.s.cfg.modulated_attention
        if wanted is False:
            return None
        sample = train_eval_view(self.s.train_ds, self.s.cfg)[0][0]
        if sample is None:
            raise UserError("the first training image is unreadable; fix it or pass --no-modulated-attention")
        training = backbone.training
        backbone.eval()
        with torch.no_grad():
            fmap = backbone.forward_features(sample[None])
        backbone.train(training)
        if fmap.ndim == 4 and fmap.shape[1] == backbone.num_features:
            return ModulatedAttention(int(fmap.shape[1]), int(fmap.shape[2]), int(fmap.shape[3]))
        if wanted:
            raise UserError(f"--modulated-attention needs a CNN feature map [B, C, H, W]; --model {self.s.cfg.model} "
                            f"gives {tuple(fmap.shape)}: use --no-modulated-attention")
        return None

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        from cmw_transfer.trainer.common import create_optimizer_and_scheduler

        cfg = self.s.cfg
        return create_optimizer_and_scheduler(
            self.model.backbone, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            sched=cfg.sched, epochs=self.stage1_epochs, warmup_lr_epochs=cfg.warmup_lr_epochs,
            steps_per_epoch=len(self.train_loader), decay_milestones=cfg.decay_milestones)

    def restore(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if int(state.get("stage", 1)) == 2:
            self.model.load_state_dict(state["model"])
            self._enter_stage2(initialise=False)  # the stage-2 optimizer, so that its state can be loaded
        return super().restore(state)

    def start(self, epoch: int) -> None:
        module = self.model if self.stage == 2 else self.model.backbone
        self.stepper = self.make_stepper(self.wrap(module))
        done = epoch - (self.stage1_epochs if self.stage == 2 else 0)
        self.stepper.num_updates = done * len(self.train_loader)

    def make_stepper(self, module: nn.Module) -> ApplyStepper:
        if self.stage == 1:
            return super().make_stepper(module)
        s = self.s
        return OLTRStepper(module, self.optimizer, self.scheduler, criterion=s.criterion,
                           normalization=s.cfg.normalization, device=s.ctx.device, amp_dtype=s.amp_dtype,
                           scaler=s.scaler, is_clean=s.is_clean, ctx=s.ctx, dcl_weight=s.cfg.dcl_weight)

    def begin_epoch(self, epoch: int) -> str:
        if self.stage == 1 and epoch >= self.stage1_epochs:
            self.stepper = None
            gc.collect()  # the stage-1 DDP wrapper and its gradient hooks go before the model is wrapped again
            self._enter_stage2(initialise=True)
            self.start(epoch)
        elif self.stage == 2 and self.s.cfg.recompute_centroids and epoch > self.stage1_epochs:
            self._set_centroids()
        return f" (OLTR stage {self.stage})"

    def weighted(self, epoch: int) -> bool:
        """The CE warm-up opens *each* stage: stage 2 starts a new classifier, whose first losses say nothing."""
        return epoch - (self.stage1_epochs if epoch >= self.stage1_epochs else 0) >= self.s.cfg.warmup_epochs

    def _enter_stage2(self, *, initialise: bool) -> None:
        cfg = self.s.cfg
        self.stage = self.model.stage = 2
        classifier = self.model.backbone.get_classifier()
        if initialise:
            hallucinator = self.model.head.hallucinator
            if isinstance(classifier, nn.Linear) and classifier.weight.shape == hallucinator.weight.shape:
                with torch.no_grad():  # as the official code: the hallucinator starts as the stage-1 classifier
                    hallucinator.weight.copy_(classifier.weight)
                    if classifier.bias is not None:
                        hallucinator.bias.copy_(classifier.bias)
            self._set_centroids()
        classifier.requires_grad_(False)  # unused in stage 2 (DDP needs every trainable parameter used)
        self.train_loader = (class_aware_loader(self.s.train_ds, cfg, self.s.ctx) if cfg.oltr_sampler == "class-aware"
                             else self.s.train_loader)
        self.optimizer, self.scheduler = stage2_optimizer(self.model, cfg, len(self.train_loader), self.stage2_epochs)

    def _set_centroids(self) -> None:
        sync_buffers(self.model, self.s.ctx)
        self.model.eval()
        centroids, _ = class_centroids(self.model.pooled, train_view_loader(self.s), self.s.ctx, self.s.num_classes,
                                       self.s.amp_dtype)
        self.model.set_centroids(centroids)

    def epoch_fields(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def checkpoint(self) -> dict[str, Any]:
        return {**super().checkpoint(), "stage": self.stage}

    def evaluate_open(self) -> dict[str, Any]:
        return evaluate_open_set(self.s, self.model, centroids=self.model.centroids if self.stage == 2 else None)


# -- open-set evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_open_set(s: RunSetup, model: nn.Module, centroids: torch.Tensor | None = None) -> dict[str, Any]:
    """Closed test split (known) + open set (unknown), rejected below the reachability threshold.

    ``centroids=None``: the class means of ``model``'s training features (ERM, OLTR stage 1). The threshold is
    ``open_threshold`` or, by default, the reachability that accepts ``open_accept`` of the known test samples.
    Every rank evaluates its shard; predictions and scores are gathered, so the numbers are exact under DDP.
    """
    cfg, ctx, device = s.cfg, s.ctx, s.ctx.device
    model.eval()
    if centroids is None:
        centroids, _ = class_centroids(lambda x: features_and_logits(model, x)[0], train_view_loader(s), ctx,
                                       s.num_classes, s.amp_dtype)
    memory = centroids.to(device).float()[torch.as_tensor(s.counts > 0, device=device)]
    preds, labels, scores = [], [], []
    for loader, unknown in ((s.eval_loaders[0][1], False), (s.open_loader, True)):
        for batch in loader:
            if batch is None or batch[1].numel() == 0:
                continue
            x = batch[0].to(device, non_blocking=True)
            with _autocast(device, s.amp_dtype):
                v, logits = features_and_logits(model, x)
            preds.append(logits.float().argmax(1).cpu())
            scores.append(reachability(v.float(), memory, cfg.reachability_scale).cpu())
            labels.append(torch.full_like(batch[1], s.num_classes) if unknown else batch[1].cpu())
    local = [torch.cat(t).numpy() if t else np.zeros(0) for t in (preds, labels, scores)]
    gathered = ctx.all_gather_object(local)
    pred, label, score = (np.concatenate([g[i] for g in gathered]) for i in range(3))
    known = label != s.num_classes
    threshold = (cfg.open_threshold if cfg.open_threshold is not None
                 else calibrated_threshold(score[known], cfg.open_accept))
    return open_set_report(pred.astype(np.int64), label.astype(np.int64), score, s.num_classes, threshold)

"""The apply (meta-test) stage: ERM training of any timm backbone with a frozen weighting net.

Per run: re-cluster the *target's* class counts into the net's K families (head ``i`` = ``i``-th smallest center,
the same code as the artifact), then train with ``w = V(CE.detach(), family[y])`` as per-sample coefficients
(``--weighting cmw``) or plain CE (``--weighting none``, the ERM baseline through the same pipeline). The first
``warmup_epochs`` are plain CE, as in the paper. ``soft_labels`` switches to the CMW-Net-SL form (mixup, EMA
teacher, pseudo-labels) of the authors' WebVision transfer.

``trainer="oltr"`` swaps the model and the step for OLTR's two stages (:mod:`cmw_transfer.trainer.oltr`) and keeps
everything else here: data, families, DDP, checkpoints, metrics; ``open_classes`` / ``open_dataset`` add the
open-set evaluation to either trainer.

The cost over plain ERM is one tiny-net forward on detached losses per step: no extra model forward (outside
SL mode, whose teacher forward is the method), no per-sample Python loop, no host synchronisation.

Reproducibility: every random stream is re-derived from ``(seed, epoch, rank)`` at the start of an epoch and the
checkpoint (written atomically after every epoch) holds model, optimizer, scheduler, scaler, teacher and
pseudo-labels, so ``resume`` after a crash reproduces the uninterrupted run exactly (CPU, fixed seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import DegenerateScalesWarning, fit_families
from cmw_transfer.atomic import write_json
from cmw_transfer.baselines import ClassBalancedWeighting, FocalWeighting
from cmw_transfer.errors import UserError
from cmw_transfer.metrics.accuracy import FEW_SHOT, MANY_SHOT, topk_correct
from cmw_transfer.metrics.log import METRICS_NAME, MetricsLog
from cmw_transfer.trainer.checkpoint import (
    CHECKPOINT_NAME,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from cmw_transfer.trainer.common import (
    DistributedContext,
    create_optimizer_and_scheduler,
    derive_seed,
    make_loader,
)
from cmw_transfer.trainer.soft_labels import (
    MIXUP_ALPHA,
    TEACHER_DECAY,
    PseudoLabelBank,
    make_teacher,
    mix_inputs,
    mixup_losses,
    sample_mixup,
    soft_label_loss,
    teacher_probs,
)
from cmw_transfer.weighting import NORMALIZATIONS, CMWLoss, loss_coefficients

CONFIG_NAME = "config.json"
FAMILIES_NAME = "families.json"
SUMMARY_NAME = "summary.json"
KILL_ENV = "CMW_TRANSFER_TEST_SIGKILL_AT"  # "EPOCH:STEP" (1-based epoch, 0-based step): crash test hook
WEIGHTINGS = ("cmw", "none", "focal", "class-balanced")  # the last two: fixed baselines (cmw_transfer.baselines)
TRAINERS = ("erm", "oltr")
OLTR_SAMPLERS = ("class-aware", "uniform")
# options only --trainer oltr reads: they enter the fingerprint of OLTR runs only, so ERM runs keep theirs
OLTR_FIELDS = ("oltr_stage1_epochs", "oltr_stage2_epochs", "oltr_backbone_lr_mult", "oltr_sampler",
               "samples_per_class", "dcl_weight", "dcl_margin", "dcl_push_weight", "cosine_scale",
               "reachability_scale", "modulated_attention", "recompute_centroids")
WEBVISION = ("webvision-full", "mini-webvision")  # evaluated on WebVision val; ILSVRC12 val via extra_eval
# settings that do not change what is computed: a resume may change them
RESUME_FREE = ("out", "resume", "workers", "eval_every", "extra_eval", "device", "overwrite", "progress",
               "open_dataset", "open_threshold", "open_accept")
RANGE_TOLERANCE = 0.01  # warn when more than 1% of the target's losses fall outside the artifact's range


@dataclass
class ApplyConfig:
    """Everything that defines an apply run; stored as ``config.json`` and fingerprinted for ``--resume``."""

    dataset: str
    out: str
    weights: str | None = None
    data_root: str | None = None
    noise: str | None = None
    imbalance: float | None = None
    model: str = "resnet18"
    img_size: int | None = None
    pretrained: bool = False
    initial_checkpoint: str | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    decay_milestones: tuple[int, ...] = ()  # multistep: epochs where lr x0.1 (default 50% and 75% of the run)
    warmup_lr_epochs: int = 0
    warmup_epochs: int = 0
    weighting: str = "cmw"
    focal_gamma: float = 2.0
    cb_beta: float = 0.999
    normalization: str = "batch"
    families: int | None = None
    soft_labels: bool = False
    mixup_alpha: float = MIXUP_ALPHA
    teacher_decay: float = TEACHER_DECAY
    amp: bool = False
    workers: int = 4
    seed: int = 0
    strict: bool = False
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 1
    eval_dataset: str | None = None
    extra_eval: tuple[str, ...] = ()
    device: str = "auto"
    progress: bool = True
    # --trainer oltr (docs/oltr.md); defaults are the official OLTR configuration's
    trainer: str = "erm"
    oltr_stage1_epochs: int | None = None  # None: --epochs
    oltr_stage2_epochs: int | None = None  # None: --epochs
    oltr_backbone_lr_mult: float = 0.1
    oltr_sampler: str = "class-aware"
    samples_per_class: int = 4
    dcl_weight: float = 0.01
    dcl_margin: float = 10.0
    dcl_push_weight: float = 0.01
    cosine_scale: float = 16.0
    reachability_scale: float = 10.0
    modulated_attention: bool | None = None  # None: on for CNN (channel-first 4-D) feature maps
    recompute_centroids: bool = False
    # open-set evaluation (both trainers)
    open_dataset: str | None = None
    open_classes: tuple[int, ...] = ()
    open_threshold: float | None = None  # None: the reachability accepting --open-accept of the known test set
    open_accept: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        config = self.to_dict()
        if self.trainer == "erm":  # an ERM run's fingerprint is the one it had before OLTR existed
            for key in (*OLTR_FIELDS, "trainer"):
                config.pop(key)
        if not self.open_classes:
            config.pop("open_classes")
        return config_fingerprint(config, ignore=RESUME_FREE)

    def stage_epochs(self) -> tuple[int, int]:
        """OLTR's (stage 1, stage 2) epochs; ERM trains one stage of ``epochs``."""
        if self.trainer != "oltr":
            return self.epochs, 0
        return (self.oltr_stage1_epochs if self.oltr_stage1_epochs is not None else self.epochs,
                self.oltr_stage2_epochs if self.oltr_stage2_epochs is not None else self.epochs)

    def total_epochs(self) -> int:
        return sum(self.stage_epochs())

    def validate(self) -> None:
        """Cheap checks, before anything is loaded or written."""
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got '{self.weighting}'")
        if self.weighting == "cmw" and not self.weights:
            raise UserError("--weighting cmw needs --weights SPEC (or use --weighting none for the ERM baseline)")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}")
        for name, value, low in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
                                 ("eval-every", self.eval_every, 1), ("warmup-epochs", self.warmup_epochs, 0),
                                 ("warmup-lr-epochs", self.warmup_lr_epochs, 0), ("workers", self.workers, 0)):
            if value < low:
                raise UserError(f"--{name} must be >= {low}, got {value}")
        if self.families is not None and self.families < 1:
            raise UserError(f"--families must be >= 1, got {self.families}")
        if not 0.0 <= self.teacher_decay < 1.0:
            raise UserError(f"--teacher-decay must be in [0, 1), got {self.teacher_decay}")
        if self.mixup_alpha < 0:
            raise UserError(f"--mixup-alpha must be >= 0, got {self.mixup_alpha}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        if self.trainer not in TRAINERS:
            raise UserError(f"--trainer must be one of {', '.join(TRAINERS)}, got '{self.trainer}'")
        if self.open_threshold is not None and not self.open_threshold > 0:
            raise UserError(f"--open-threshold must be > 0 (a reachability), got {self.open_threshold}")
        if not 0.0 < self.open_accept <= 1.0:
            raise UserError(f"--open-accept must be in (0, 1], got {self.open_accept}")
        if self.open_dataset and self.open_classes:
            raise UserError("--open-dataset and --open-classes both define the open set; pick one")
        if self.trainer == "oltr":
            self._validate_oltr()

    def _validate_oltr(self) -> None:
        if self.soft_labels:
            raise UserError("--soft-labels is a form of the ERM trainer; drop it or use --trainer erm")
        if self.oltr_sampler not in OLTR_SAMPLERS:
            raise UserError(f"--oltr-sampler must be one of {', '.join(OLTR_SAMPLERS)}, got '{self.oltr_sampler}'")
        stage1, stage2 = self.stage_epochs()
        for name, value, low in (("oltr-stage1-epochs", stage1, 1), ("oltr-stage2-epochs", stage2, 1),
                                 ("samples-per-class", self.samples_per_class, 1)):
            if value < low:
                raise UserError(f"--{name} must be >= {low}, got {value}")
        for name, value in (("oltr-backbone-lr-mult", self.oltr_backbone_lr_mult), ("dcl-weight", self.dcl_weight),
                            ("dcl-margin", self.dcl_margin), ("dcl-push-weight", self.dcl_push_weight)):
            if not value >= 0:
                raise UserError(f"--{name} must be >= 0, got {value}")
        for name, value in (("cosine-scale", self.cosine_scale), ("reachability-scale", self.reachability_scale)):
            if not value > 0:
                raise UserError(f"--{name} must be > 0, got {value}")


# -- families -----------------------------------------------------------------------------------------------------
def target_families(net: CMWNet, class_counts: np.ndarray, requested: int | None = None) -> dict[str, Any]:
    """Meta-test re-clustering: target class counts -> K centers -> family of each class -> head of that rank."""
    k = net.num_heads
    if requested is not None and requested != k:
        raise UserError(f"the weights have K={k} heads but --families {requested} was requested; drop --families "
                        f"or use a net meta-trained with {requested} families")
    counts = np.asarray(class_counts, dtype=np.int64)
    present = int((counts > 0).sum())
    if present < 2:
        raise UserError(f"the training set has {present} class(es) with samples ({counts.size} declared): a "
                        "classifier needs at least 2; check --dataset / --noise / --imbalance")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DegenerateScalesWarning)
        centers, family = fit_families(counts, k)
    notes = [str(w.message) for w in caught if issubclass(w.category, DegenerateScalesWarning)]
    for w in caught:  # hand the warnings on (the CLI prints them as ``warning: ...``)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    info = {
        "num_classes": int(counts.size),
        "num_heads": k,
        "class_counts": counts.tolist(),
        "centers": [float(c) for c in centers],
        "family_of_class": [int(f) for f in family],
        "head_of_class": [int(f) for f in family],  # head i = i-th smallest center, by construction
        "classes_per_head": np.bincount(family, minlength=k).astype(int).tolist(),
        "source_centers": net.centers,
        "degenerate_rule": notes[0] if notes else None,
    }
    info["digest"] = hashlib.sha256(json.dumps(info["family_of_class"]).encode()).hexdigest()[:16]
    return info


def loss_range_report(losses: np.ndarray, loss_range: dict[str, float] | None) -> dict[str, Any]:
    """Where the target's per-sample losses sit relative to the range recorded in the artifact."""
    if losses.size == 0:
        return {}
    q = np.quantile(losses, [0.01, 0.5, 0.99])
    report: dict[str, Any] = {"loss_p1": float(q[0]), "loss_p50": float(q[1]), "loss_p99": float(q[2]),
                              "loss_max": float(losses.max())}
    if loss_range:
        low = loss_range.get("min", loss_range.get("p1"))
        high = loss_range.get("max", loss_range.get("p99"))
        if low is not None and high is not None:
            report["frac_outside_range"] = float(np.mean((losses < low) | (losses > high)))
            report["source_range"] = [float(low), float(high)]
    return report


# -- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sharded(model: nn.Module, loader: Any, ctx: DistributedContext, num_classes: int,
                     train_counts: np.ndarray | None, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """top-1/top-5 (%) and many/medium/few-shot top-1, exact under DDP: per-class hit counts summed over ranks."""
    model.eval()
    device = ctx.device
    hits = torch.zeros(3, num_classes, dtype=torch.float64, device=device)  # top1, top5, total per class
    for batch in loader:
        if batch is None or batch[1].numel() == 0:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        top = topk_correct(logits.float(), y)
        hits[0].index_add_(0, y, top[1].double())
        hits[1].index_add_(0, y, top[5].double())
        hits[2].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    hits = ctx.all_reduce_sum(hits.cpu()).numpy()
    total = hits[2].sum()
    if total == 0:
        return {"top1": None, "top5": None, "n": 0}
    out: dict[str, Any] = {"top1": 100.0 * hits[0].sum() / total, "top5": 100.0 * hits[1].sum() / total,
                           "n": int(total)}
    if train_counts is not None:
        counts = np.asarray(train_counts)
        splits = {"many": counts > MANY_SHOT, "medium": (counts >= FEW_SHOT) & (counts <= MANY_SHOT),
                  "few": counts < FEW_SHOT}
        for name, mask in splits.items():
            n = hits[2][mask].sum()
            out[f"{name}_top1"] = 100.0 * float(hits[0][mask].sum() / n) if n else None
            out[f"{name}_n"] = int(n)
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


def sync_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Rank 0's buffers (BatchNorm statistics: per rank in training) on every rank, so that every shard is
    evaluated with the model that rank 0 checkpoints. DDP broadcasts them before each forward anyway."""
    if ctx.enabled:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# -- the step -----------------------------------------------------------------------------------------------------
class ApplyStepper:
    """One optimisation step of the apply stage; also what ``scripts/bench_apply.py`` times.

    ``stats`` accumulates on the device (no ``.item()`` per step): loss sum, weight sum, correct, count,
    weights of clean and noisy samples when the ground truth is known.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 criterion: CMWLoss | None = None, normalization: str = "batch", device: torch.device | None = None,
                 amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                 soft: SoftLabelState | None = None, is_clean: torch.Tensor | None = None,
                 ctx: DistributedContext | None = None, collect_losses: bool = True) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.criterion, self.normalization = criterion, normalization
        self.device = device or next(model.parameters()).device
        self.amp_dtype, self.scaler, self.soft, self.is_clean = amp_dtype, scaler, soft, is_clean
        self.ctx = ctx
        self.collect_losses = collect_losses
        self.num_updates = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = torch.zeros(7, dtype=torch.float64, device=self.device)
        self.loss_samples: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weighted: bool) -> torch.Tensor:
        if self.soft is not None and weighted:
            return self._soft_step(x, y, idx)
        self.model.train()
        with _autocast(self.device, self.amp_dtype):
            logits, extra = self._forward(x, y)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        if weighted and self.criterion is not None:
            w = self.criterion.weights(losses, y)
            loss = (loss_coefficients(w, self.normalization) * losses).sum()
        else:
            w = None
            loss = losses.mean()
        if extra is not None:  # an unweighted auxiliary loss (OLTR's centroid loss)
            loss = loss + extra
        self._backward_and_step(loss)
        if self.soft is not None:  # warm-up epochs of SL mode: the teacher follows from the start
            self.soft.teacher.update(_unwrap(self.model))
        self._record(loss, losses, logits, y, idx, w)
        return loss.detach()

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and an auxiliary loss added unweighted (None here; subclasses add one)."""
        return self.model(x), None

    def _soft_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        soft = self.soft
        assert soft is not None
        pseudo = soft.update_pseudo(idx, teacher_probs(soft.teacher, x), self.ctx)
        lam, perm = sample_mixup(x.shape[0], soft.alpha, soft.rng, x.device)
        self.model.train()
        with _autocast(self.device, self.amp_dtype):
            logits = self.model(mix_inputs(x, lam, perm))
        logits = logits.float()
        labels, losses2 = mixup_losses(logits, y, perm)
        if self.criterion is not None:
            v = self.criterion.weights(losses2, labels)
        else:
            v = torch.ones_like(losses2)
        size = y.shape[0]
        loss = soft_label_loss(logits, y, pseudo, (v[:size], v[size:]), lam, perm)
        self._backward_and_step(loss)
        soft.teacher.update(_unwrap(self.model))
        self._record(loss, losses2[:size], logits, y, idx, v[:size] if self.criterion is not None else None)
        return loss.detach()

    def null_step(self, shape: tuple[int, ...]) -> None:
        """Join the DDP all-reduce with zero gradients (a batch whose images were all unreadable).

        Eval mode keeps BatchNorm statistics untouched; DDP still syncs because grad mode is on.
        """
        self.model.eval()
        loss = self.model(torch.zeros(shape, device=self.device)).float().sum() * 0.0
        self._backward_and_step(loss)
        if self.soft is not None:
            self.soft.teacher.update(_unwrap(self.model))

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)

    @torch.no_grad()
    def _record(self, loss: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                idx: torch.Tensor, w: torch.Tensor | None) -> None:
        n = y.shape[0]
        row = [loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
               torch.tensor(float(n), dtype=torch.float64, device=self.device)]
        if w is not None:
            row.append(w.double().sum())
            if self.is_clean is not None:
                clean = self.is_clean[idx].double()
                row += [(w.double() * clean).sum(), clean.sum(), (w.double() * (1 - clean)).sum()]
        self.stats[: len(row)] += torch.stack(row)
        if self.collect_losses:
            self.loss_samples.append(losses.detach())

    def epoch_stats(self, ctx: DistributedContext) -> dict[str, Any]:
        """Train metrics of the epoch, reduced over ranks (one collective)."""
        s = ctx.all_reduce_sum(self.stats.cpu()).numpy()
        n = max(s[2], 1.0)
        out: dict[str, Any] = {"train_loss": s[0] / n, "train_acc": 100.0 * s[1] / n}
        if s[3] > 0:
            out["mean_weight"] = s[3] / n
            if self.is_clean is not None:
                noisy = n - s[5]
                out["mean_weight_clean"] = s[4] / s[5] if s[5] else None
                out["mean_weight_noisy"] = s[6] / noisy if noisy else None
        return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}

    def losses_seen(self) -> np.ndarray:
        if not self.loss_samples:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(self.loss_samples).float().cpu().numpy()


class SoftLabelState:
    """Teacher, pseudo-label bank and mixup stream of SL mode; the bank stays identical on every rank."""

    def __init__(self, model: nn.Module, targets: np.ndarray, num_classes: int, *, device: torch.device,
                 decay: float, alpha: float, batch_size: int) -> None:
        self.teacher = make_teacher(model, decay)
        self.bank = PseudoLabelBank(targets, num_classes, device=device)
        self.alpha = alpha
        self.batch_size = batch_size
        self.rng = np.random.default_rng(0)

    def update_pseudo(self, idx: torch.Tensor, probs: torch.Tensor, ctx: DistributedContext | None) -> torch.Tensor:
        rows = self.bank.blend(idx, probs)
        if ctx is None or not ctx.enabled:
            self.bank.write(idx, rows)
            return rows
        # every rank writes every rank's rows, padded to the loader's batch size so shapes agree
        size = self.batch_size
        pad_idx = torch.full((size,), -1, dtype=torch.long, device=rows.device)
        pad_rows = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=rows.device)
        pad_idx[: idx.shape[0]] = idx.to(rows.device)
        pad_rows[: idx.shape[0]] = rows
        all_idx = [torch.empty_like(pad_idx) for _ in range(ctx.world_size)]
        all_rows = [torch.empty_like(pad_rows) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(all_idx, pad_idx)
        torch.distributed.all_gather(all_rows, pad_rows)
        gi, gr = torch.cat(all_idx), torch.cat(all_rows)
        keep = gi >= 0
        self.bank.write(gi[keep], gr[keep])
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.module.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.module.load_state_dict(state["teacher"])
        self.bank.load_state_dict(state["bank"])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# -- datasets -----------------------------------------------------------------------------------------------------
def _train_transform(ds: Any, img_size: int | None) -> Any:
    """Standard augmentation for CIFAR-size in-memory sets; None keeps the dataset's own default."""
    shape = getattr(ds, "input_shape", None)
    if shape is None or img_size is not None or shape[1] < 32:
        return None
    from torchvision import transforms

    return transforms.Compose([transforms.RandomCrop(shape[1], padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor()])


def load_datasets(cfg: ApplyConfig) -> tuple[Any, list[tuple[str, Any]]]:
    """Train split with the requested bias; the clean evaluation splits (test / WebVision val, ``extra_eval``)."""
    from cmw_transfer.dataset import create_dataset, resolve_source

    def make(name: str, root: str | None, split: str, **kwargs: Any) -> Any:
        try:
            return create_dataset(name, root, split, seed=cfg.seed, strict=cfg.strict, **kwargs)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise UserError(f"--data-dir: {exc}; download the data or point --data-dir at it") from None

    transform = eval_tf = None
    if cfg.img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        transform, eval_tf = make_transform("train", cfg.img_size), make_transform("val", cfg.img_size)
    train = make(cfg.dataset, cfg.data_root, "train", transform=transform, noise=cfg.noise, imbalance=cfg.imbalance)
    if transform is None:
        aug = _train_transform(train, cfg.img_size)
        if aug is not None:  # the untransformed eval tensor equals ToTensor of this augmentation's output
            train.transform = aug
    base, _ = resolve_source(cfg.dataset)  # a preset's noise never reaches the evaluation split
    if cfg.eval_dataset:
        test = make(cfg.eval_dataset, None, "test", transform=eval_tf)
    elif base.startswith(("list:", "folder:")):
        raise UserError(f"--dataset {cfg.dataset} has no built-in test split: add --eval-dataset list:VAL.txt or "
                        "--eval-dataset folder:VAL_DIR")
    else:
        test = make(base, cfg.data_root, "val" if base in WEBVISION else "test", transform=eval_tf)
    evals = [("test", test)]
    for item in cfg.extra_eval:
        label, _, spec = item.partition("=")
        if not spec or not label.isidentifier():
            raise UserError(f"--extra-eval '{item}': expected NAME=SPEC, e.g. ilsvrc12=list:/data/imagenet/val.txt")
        extra = make(spec, None, "val", transform=eval_tf)
        evals.append((label, extra))
    for label, ds in evals:
        if ds.num_classes > train.num_classes:
            raise UserError(f"evaluation set '{label}' has {ds.num_classes} classes but the training set has "
                            f"{train.num_classes}; its labels must use the training set's class indices")
    return train, evals


def _check_model_name(name: str) -> None:
    import timm

    from cmw_transfer.models import create_model, list_builtin_models

    if name.replace("-", "_") not in list_builtin_models() and not timm.is_model(name):
        create_model(name, num_classes=2)  # raises the UserError with near matches


# -- the run ------------------------------------------------------------------------------------------------------
def _prepare_out(cfg: ApplyConfig, out: Path) -> dict[str, Any] | None:
    """Refuse to clobber a run; load the checkpoint for ``resume`` (before anything is written)."""
    ckpt_path = out / CHECKPOINT_NAME
    if cfg.resume:
        return load_checkpoint(ckpt_path, cfg.fingerprint())
    if ckpt_path.exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a run ({CHECKPOINT_NAME}); use --resume to continue it, --overwrite "
                        "to start over, or another --out")
    return None


def _kill_point() -> tuple[int, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    epoch, step = spec.split(":")
    return int(epoch), int(step)


def run_apply(cfg: ApplyConfig) -> dict[str, Any]:
    """Train, evaluate, write the run directory; returns the summary (every rank gets it)."""
    cfg.validate()
    ctx = DistributedContext.from_env(cfg.device)
    try:
        return _run(cfg, ctx)
    finally:
        ctx.teardown()


@dataclass
class RunSetup:
    """What every trainer shares: data and loaders, the frozen net's criterion and families, AMP, the run dir."""

    cfg: ApplyConfig
    ctx: DistributedContext
    out: Path
    state: dict[str, Any] | None
    net: CMWNet | None
    families: dict[str, Any] | None
    criterion: CMWLoss | FocalWeighting | ClassBalancedWeighting | None
    train_ds: Any
    eval_sets: list[tuple[str, Any]]
    open_ds: Any
    counts: np.ndarray
    num_classes: int
    in_chans: int
    train_loader: Any
    eval_loaders: list[tuple[str, Any]]
    open_loader: Any
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    is_clean: torch.Tensor | None


def _setup(cfg: ApplyConfig, ctx: DistributedContext) -> RunSetup:
    from cmw_transfer.models import input_geometry

    out = Path(cfg.out)
    state = _prepare_out(cfg, out)
    _check_model_name(cfg.model)
    # --weighting none ignores --weights, so the baseline is the same command with one option changed
    net = CMWNet.from_pretrained(cfg.weights) if cfg.weights and cfg.weighting == "cmw" else None
    if net is not None and cfg.families is not None and cfg.families != net.num_heads:
        target_families(net, np.zeros(0), cfg.families)  # raises the K mismatch before data is loaded

    train_ds, eval_sets = load_datasets(cfg)
    open_ds = None
    if cfg.open_classes or cfg.open_dataset or cfg.dataset.strip() == "imagenet-lt":
        from cmw_transfer.trainer.oltr import prepare_open_set

        train_ds, eval_sets, open_ds = prepare_open_set(cfg, train_ds, eval_sets)
    counts = train_ds.class_counts()
    num_classes = int(train_ds.num_classes)
    if int((counts > 0).sum()) < 2:
        raise UserError(f"the training set has {int((counts > 0).sum())} class(es) with samples: a classifier "
                        "needs at least 2; check --dataset / --noise / --imbalance")

    families = None
    criterion = None
    device = ctx.device
    if net is not None:
        with warnings.catch_warnings():
            if not ctx.is_main:  # the same warning once, not once per rank
                warnings.simplefilter("ignore")
            families = target_families(net, counts, cfg.families)  # deterministic: seeded k-means
        digests = ctx.all_gather_object(families["digest"])
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks disagree on the target families: {digests}")
        families["rank_digests"] = digests
        families["ranks_agree"] = True
        criterion = CMWLoss(net, families["family_of_class"], cfg.normalization).to(device)
    elif cfg.weighting == "focal":
        criterion = FocalWeighting(cfg.focal_gamma, cfg.normalization).to(device)
    elif cfg.weighting == "class-balanced":
        criterion = ClassBalancedWeighting(counts, cfg.cb_beta, cfg.normalization).to(device)

    def loader(ds: Any, train: bool) -> Any:
        return make_loader(ds, cfg.batch_size, train=train, workers=cfg.workers, seed=cfg.seed,
                           distributed=ctx.enabled)

    amp_dtype = None
    scaler = None
    if cfg.amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        if device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
    is_clean = None
    if train_ds.clean_targets is not None:
        is_clean = torch.as_tensor(train_ds.targets == train_ds.clean_targets, device=device)
    return RunSetup(cfg=cfg, ctx=ctx, out=out, state=state, net=net, families=families, criterion=criterion,
                    train_ds=train_ds, eval_sets=eval_sets, open_ds=open_ds, counts=counts, num_classes=num_classes,
                    in_chans=input_geometry(getattr(train_ds, "input_shape", (3, 0, 0)), cfg.img_size)[0],
                    train_loader=loader(train_ds, True),
                    eval_loaders=[(label, loader(ds, False)) for label, ds in eval_sets],
                    open_loader=loader(open_ds, False) if open_ds is not None else None, amp_dtype=amp_dtype,
                    scaler=scaler, is_clean=is_clean)


class ERMTrainer:
    """The apply stage's model, optimizer and step: (CMW-weighted) ERM, optionally in the soft-label form.

    The run loop (:func:`_train`) only talks to this interface, so another trainer (``OLTRTrainer`` in
    :mod:`cmw_transfer.trainer.oltr`) changes the model and the step, and inherits data, weighting, DDP,
    checkpoints, metrics and evaluation.
    """

    def __init__(self, s: RunSetup) -> None:
        self.s = s
        cfg = s.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        self.model = self.build_model().to(s.ctx.device)
        self.train_loader = s.train_loader
        self.optimizer, self.scheduler = self.make_optimizer()
        self.soft = None
        if cfg.soft_labels:
            self.soft = SoftLabelState(self.model, s.train_ds.targets, s.num_classes, device=s.ctx.device,
                                       decay=cfg.teacher_decay, alpha=cfg.mixup_alpha, batch_size=cfg.batch_size)
        self.stepper: ApplyStepper | None = None

    def build_model(self) -> nn.Module:
        from cmw_transfer.models import create_model

        cfg, shape = self.s.cfg, getattr(self.s.train_ds, "input_shape", None)
        return create_model(cfg.model, num_classes=self.s.num_classes, in_chans=self.s.in_chans,
                            pretrained=cfg.pretrained, checkpoint_path=cfg.initial_checkpoint, img_size=cfg.img_size,
                            input_size=tuple(shape[1:]) if shape and cfg.img_size is None else None)

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.s.cfg
        return create_optimizer_and_scheduler(
            self.model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            sched=cfg.sched, epochs=cfg.epochs, warmup_lr_epochs=cfg.warmup_lr_epochs,
            steps_per_epoch=len(self.train_loader), decay_milestones=cfg.decay_milestones)

    def restore(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Load a checkpoint (before :meth:`start`); returns (epochs done, best so far)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.s.scaler is not None and state.get("scaler"):
            self.s.scaler.load_state_dict(state["scaler"])
        if self.soft is not None:
            self.soft.load_state_dict(state["soft"])
        return int(state["epoch"]), dict(state["best"])

    def start(self, epoch: int) -> None:
        """Wrap for DDP and build the step, continuing the lr schedule at ``epoch``."""
        self.stepper = self.make_stepper(self.wrap(self.model))
        self.stepper.num_updates = epoch * len(self.train_loader)

    def wrap(self, module: nn.Module) -> nn.Module:
        ctx = self.s.ctx
        if not ctx.enabled:
            return module
        return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def make_stepper(self, module: nn.Module) -> ApplyStepper:
        s = self.s
        return ApplyStepper(module, self.optimizer, self.scheduler, criterion=s.criterion,
                            normalization=s.cfg.normalization, device=s.ctx.device, amp_dtype=s.amp_dtype,
                            scaler=s.scaler, soft=self.soft, is_clean=s.is_clean, ctx=s.ctx)

    def begin_epoch(self, epoch: int) -> str:
        """Called before every epoch; returns a note for the progress bar."""
        return ""

    def weighted(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) uses the net's weights: after the plain-CE warm-up epochs."""
        return epoch >= self.s.cfg.warmup_epochs

    def epoch_fields(self) -> dict[str, Any]:
        return {}

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.s.scaler.state_dict() if self.s.scaler is not None else None,
            "soft": self.soft.state_dict() if self.soft is not None else None,
        }

    def evaluate_open(self) -> dict[str, Any]:
        """Open-set metrics, rejecting by reachability to the class means of the training features."""
        from cmw_transfer.trainer.oltr import evaluate_open_set

        return evaluate_open_set(self.s, self.model, centroids=None)


def _run(cfg: ApplyConfig, ctx: DistributedContext) -> dict[str, Any]:
    s = _setup(cfg, ctx)
    if cfg.trainer == "oltr":
        from cmw_transfer.trainer.oltr import OLTRTrainer

        trainer: ERMTrainer = OLTRTrainer(s)
    else:
        trainer = ERMTrainer(s)
    start_epoch, best = 0, {"top1": None, "epoch": None}
    if s.state is not None:
        start_epoch, best = trainer.restore(s.state)
    trainer.start(start_epoch)
    return _train(s, trainer, start_epoch, best)


def _train(s: RunSetup, trainer: ERMTrainer, start_epoch: int, best: dict[str, Any]) -> dict[str, Any]:
    cfg, ctx, out, state, net = s.cfg, s.ctx, s.out, s.state, s.net
    device = ctx.device
    epochs = cfg.total_epochs()
    log = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            write_json(out / CONFIG_NAME, {**cfg.to_dict(), "fingerprint": cfg.fingerprint(),
                                           "world_size": ctx.world_size})
        if s.families is not None:
            write_json(out / FAMILIES_NAME, s.families)
        log = MetricsLog(out / METRICS_NAME, resume_from_epoch=start_epoch + 1 if state is not None else None)
        _describe_start(cfg, ctx, s.train_ds, s.families, net, start_epoch)
        if s.open_ds is not None:
            held = f" (held-out classes {list(cfg.open_classes)})" if cfg.open_classes else ""
            tqdm.write(f"open set: {len(s.open_ds)} unknown samples{held}, rejected below the reachability "
                       + (f"{cfg.open_threshold}" if cfg.open_threshold is not None else
                          f"accepting {100 * cfg.open_accept:g}% of the known test samples"), file=_stderr())

    eval_labels = {label for label, _ in s.eval_loaders} | ({"open"} if s.open_loader is not None else set())
    kill_at = _kill_point()
    range_warned = False
    final_eval: dict[str, Any] = {}
    t_run = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        note = trainer.begin_epoch(epoch)
        stepper, train_loader = trainer.stepper, trainer.train_loader
        assert stepper is not None
        weighted = trainer.weighted(epoch)
        train_loader.set_epoch(epoch)
        torch.manual_seed(derive_seed(cfg.seed, epoch, ctx.rank))
        if trainer.soft is not None:
            trainer.soft.rng = np.random.default_rng(derive_seed(cfg.seed, epoch, ctx.rank, 1))
        stepper.reset_stats()
        bar = tqdm(total=len(train_loader) * cfg.batch_size * ctx.world_size, unit="img", unit_scale=True, leave=False,
                   desc=f"epoch {epoch + 1}/{epochs}" + note + ("" if weighted else " (CE warm-up)"),
                   disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
        t0, seen, last_shape = time.perf_counter(), 0, None
        for step, batch in enumerate(train_loader):
            if kill_at is not None and kill_at == (epoch + 1, step):
                os.kill(os.getpid(), signal.SIGKILL)
            x, y, idx = batch
            if y.numel() == 0:  # every image of the batch was unreadable
                if ctx.enabled and last_shape is not None:
                    stepper.null_step(last_shape)  # the other ranks wait for this rank's gradients
                continue
            last_shape = tuple(x.shape)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            idx = idx.to(device, non_blocking=True)
            stepper(x, y, idx, weighted)
            seen += y.shape[0]
            bar.update(y.shape[0] * ctx.world_size)
        bar.close()
        elapsed = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "weighted": bool(weighted and s.criterion is not None),
                               "lr": float(trainer.optimizer.param_groups[0]["lr"])}
        row.update(trainer.epoch_fields())
        row.update(stepper.epoch_stats(ctx))
        row["images_per_s"] = float(ctx.all_reduce_sum(seen / max(elapsed, 1e-9)).item())
        if net is not None:
            rng_report = loss_range_report(stepper.losses_seen(), net.loss_range)
            row.update({k: v for k, v in rng_report.items() if k != "source_range"})
            frac = rng_report.get("frac_outside_range")
            if ctx.is_main and frac is not None and frac > RANGE_TOLERANCE and not range_warned:
                warnings.warn(f"epoch {epoch + 1}: {100 * frac:.1f}% of the target's training losses lie outside the "
                              f"loss range the net was meta-trained on {rng_report['source_range']} (target p1/p99 "
                              f"{rng_report['loss_p1']:.3g}/{rng_report['loss_p99']:.3g}); its weights there are "
                              "extrapolated", stacklevel=2)
                range_warned = True
        last = epoch + 1 == epochs
        if last or (epoch + 1) % cfg.eval_every == 0:
            sync_buffers(trainer.model, ctx)
            for label, loader in s.eval_loaders:
                res = evaluate_sharded(trainer.model, loader, ctx, s.num_classes, s.counts, s.amp_dtype)
                row.update({f"{label}_{k}": v for k, v in res.items()})
            if s.open_loader is not None:
                row.update({f"open_{k}": v for k, v in trainer.evaluate_open().items()})
            final_eval = {k: v for k, v in row.items() if k.split("_", 1)[0] in eval_labels}
            top1 = row.get("test_top1")
            if top1 is not None and (best["top1"] is None or top1 > best["top1"]):
                best = {"top1": top1, "epoch": epoch + 1}
        if ctx.is_main:
            assert log is not None
            log.append(row)
            tqdm.write(_epoch_line(row), file=_stderr())
            ckpt = {"fingerprint": cfg.fingerprint(), "epoch": epoch + 1, "best": best, **trainer.checkpoint()}
            save_checkpoint(out / CHECKPOINT_NAME, ckpt)
        ctx.barrier()

    summary = _summary(cfg, ctx, out, final_eval, best, s.families, time.perf_counter() - t_run, log)
    if ctx.is_main:
        write_json(out / SUMMARY_NAME, summary)
    ctx.barrier()
    return summary


def _summary(cfg: ApplyConfig, ctx: DistributedContext, out: Path, final_eval: dict[str, Any], best: dict[str, Any],
             families: dict[str, Any] | None, seconds: float, log: MetricsLog | None) -> dict[str, Any]:
    rows = log.read() if log is not None else []
    if not final_eval and rows:  # resumed after the last epoch: report what the log holds
        labels = ("test", "open", *(item.partition("=")[0] for item in cfg.extra_eval))
        final_eval = {k: v for k, v in rows[-1].items() if k.split("_", 1)[0] in labels}
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return {
        "out": str(out),
        "dataset": cfg.dataset,
        "model": cfg.model,
        "weighting": cfg.weighting,
        "soft_labels": cfg.soft_labels,
        "weights": cfg.weights,
        "trainer": cfg.trainer,
        "epochs": cfg.total_epochs(),
        "world_size": ctx.world_size,
        "final": final_eval,
        "best_test_top1": best["top1"],
        "best_epoch": best["epoch"],
        "families_per_head": families["classes_per_head"] if families else None,
        "images_per_s": float(np.median(speeds)) if speeds else None,
        "seconds_this_session": seconds,
    }


def _stderr() -> Any:
    import sys

    return sys.stderr


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _epoch_line(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {_fmt(row.get('train_loss'))}", f"train {_fmt(row.get('train_acc'))}%"]
    if "stage" in row:
        parts.insert(1, f"stage {row['stage']}")
    if "mean_weight" in row:
        parts.append(f"w {row['mean_weight']:.3f}")
    if "test_top1" in row:
        parts.append(f"test top1 {_fmt(row['test_top1'])} top5 {_fmt(row.get('test_top5'))}")
    if "open_f1" in row:
        parts.append(f"open F {_fmt(row['open_f1'])}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def _describe_start(cfg: ApplyConfig, ctx: DistributedContext, train_ds: Any, families: dict[str, Any] | None,
                    net: CMWNet | None, start_epoch: int) -> None:
    err = _stderr()
    noise = train_ds.noise_rate() if hasattr(train_ds, "noise_rate") else None
    tqdm.write(f"apply: {train_ds.describe()}" + (f", realised noise {100 * noise:.1f}%" if noise is not None else "")
               + f"; model {cfg.model}; trainer {cfg.trainer}; weighting {cfg.weighting}"
               f"{' + soft labels' if cfg.soft_labels else ''}; "
               f"world size {ctx.world_size}; device {ctx.device}", file=err)
    if families is not None and net is not None:
        tqdm.write(f"families: centers {[round(c, 1) for c in families['centers']]} -> classes per head "
                   f"{families['classes_per_head']} (source centers {net.centers})", file=err)
    if start_epoch:
        tqdm.write(f"resuming after epoch {start_epoch}", file=err)

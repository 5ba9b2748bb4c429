"""``apply --trainer oltr`` (stage ``oltr``): two-stage OLTR with the frozen CMW-Net.

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
DDP and resume simple, and ``recompute_centroids`` follows the features when wanted. The open-set evaluation both
trainers share lives in :mod:`cmw_transfer.trainer.apply.openset`.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from cmw_transfer.errors import UserError
from cmw_transfer.models.oltr import ModulatedAttention, OLTRModel, check_backbone
from cmw_transfer.trainer.apply.erm import ERMTrainer
from cmw_transfer.trainer.apply.openset import class_centroids, train_eval_view, train_view_loader
from cmw_transfer.trainer.apply.setup import RunSetup
from cmw_transfer.trainer.apply.steps import ApplyStepper
from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.evaluation import sync_buffers
from cmw_transfer.trainer.engine.loaders import EpochLoader, _default_collate, _seed_worker, derive_seed
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler
from cmw_transfer.trainer.engine.registry import register_trainer


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
                       generator=torch.Generator(),
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


@register_trainer("oltr")
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
        cfg = self.s.cfg
        return create_optimizer_and_scheduler(
            self.model.backbone, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            sched=cfg.sched, epochs=self.stage1_epochs, warmup_lr_epochs=cfg.warmup_lr_epochs,
            steps_per_epoch=len(self.loader), decay_milestones=cfg.decay_milestones)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("stage", 1)) == 2:
            self.model.load_state_dict(state["model"])
            self._enter_stage2(initialise=False)  # the stage-2 optimizer, so that its state can be loaded
        super().load_state_dict(state)

    def start(self, epoch: int) -> None:
        module = self.model if self.stage == 2 else self.model.backbone
        self.stepper = self.make_stepper(self.wrap(module))
        done = epoch - (self.stage1_epochs if self.stage == 2 else 0)
        self.stepper.num_updates = done * len(self.loader)

    def make_stepper(self, module: nn.Module) -> ApplyStepper:
        if self.stage == 1:
            return super().make_stepper(module)
        s = self.s
        return OLTRStepper(module, self.optimizer, self.scheduler, criterion=s.criterion, amp_dtype=s.amp_dtype,
                           scaler=s.scaler, is_clean=s.is_clean, ctx=s.ctx, dcl_weight=s.cfg.dcl_weight)

    def prepare_epoch(self, epoch: int) -> str:
        if self.stage == 1 and epoch >= self.stage1_epochs:
            self.stepper = None
            gc.collect()  # the stage-1 DDP wrapper and its gradient hooks go before the model is wrapped again
            self._enter_stage2(initialise=True)
            self.start(epoch)
        elif self.stage == 2 and self.s.cfg.recompute_centroids and epoch > self.stage1_epochs:
            self._set_centroids()
        return f" (OLTR stage {self.stage})"

    def weighted(self, epoch: int) -> bool:
        """A fixed CE warm-up opens *each* stage: stage 2 starts a new classifier, whose first losses say nothing.
        ``auto`` decides once, on the first stage's losses (the shared gate of the apply stage)."""
        if self.s.cfg.warmup_epochs == "auto" or self.gate.disabled:  # disabled: the trust check fell back
            return super().weighted(epoch)
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
        self.loader = (class_aware_loader(self.s.train_ds, cfg, self.s.ctx) if cfg.oltr_sampler == "class-aware"
                       else self.s.train_loader)
        self.optimizer, self.scheduler = stage2_optimizer(self.model, cfg, len(self.loader), self.stage2_epochs)

    def _set_centroids(self) -> None:
        sync_buffers(self.model, self.s.ctx)
        self.model.eval()
        centroids, _ = class_centroids(self.model.pooled, train_view_loader(self.s.train_ds, self.s.cfg, self.s.ctx),
                                       self.s.ctx, self.s.num_classes, self.s.amp_dtype)
        self.model.set_centroids(centroids)

    def epoch_fields(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage}

    def evaluate_open(self) -> dict[str, Any]:
        return self.open_set_metrics(self.model.centroids if self.stage == 2 else None)



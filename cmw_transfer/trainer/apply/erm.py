"""The apply (meta-test) stage, ``erm``: ERM training of any timm backbone with a frozen weighting net.

Per run: re-cluster the *target's* class counts into the net's K families (head ``i`` = ``i``-th smallest center,
the same code as the artifact), then train with ``w = V(CE.detach(), family[y])`` as per-sample coefficients
(``--weighting cmw``) or plain CE (``--weighting none``, the ERM baseline through the same pipeline). The first
``warmup_epochs`` are plain CE, as in the paper. ``soft_labels`` switches to the CMW-Net-SL form (mixup, EMA
teacher, pseudo-labels) of the authors' WebVision transfer.

The run's shared inputs (data, loaders, families, criterion, AMP) are built once in :func:`build_setup`; the stage
(:class:`ERMTrainer`) adds the model, optimizer and step, and the engine runs the epochs (resume, checkpoints,
metrics, signals). ``trainer="oltr"`` selects another registered stage (:mod:`cmw_transfer.trainer.apply.oltr`)
through the registry; this module never imports it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmw_transfer.atomic import write_json
from cmw_transfer.models.oltr import features_and_logits
from cmw_transfer.progress import progress_write
from cmw_transfer.trainer.apply.openset import class_centroids, evaluate_open_set, train_view_loader
from cmw_transfer.trainer.apply.report import describe_start, epoch_line, plot_training, summary
from cmw_transfer.trainer.apply.setup import RunSetup, build_setup, check_memory
from cmw_transfer.trainer.apply.steps import ApplyStepper, SoftLabelState
from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.evaluation import evaluate_sharded, sync_buffers
from cmw_transfer.trainer.engine.loaders import derive_seed
from cmw_transfer.trainer.engine.loop import Stage
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler
from cmw_transfer.trainer.engine.registry import register_trainer
from cmw_transfer.weighting.cmw import CMWLoss
from cmw_transfer.weighting.guards import (
    RANGE_TOLERANCE,
    STARVED_FRACTION,
    WarmupGate,
    describe_range_sides,
    range_bounds,
)

CONFIG_NAME = "config.json"
FAMILIES_NAME = "families.json"
SUMMARY_NAME = "summary.json"
CLASSIFIER_NAME = "classifier.safetensors"  # the final classifier's weights (timm/safetensors, no pickle)
BEST_CLASSIFIER_NAME = "classifier_best.safetensors"  # the best-test-top-1 epoch's, kept as it happens
TRAINING_PLOT_NAME = "training.png"


def save_classifier(model: nn.Module, path: Path) -> None:
    """The classifier's weights as safetensors, atomically (shared tensors handled by ``save_model``)."""
    from safetensors.torch import save_model

    from cmw_transfer.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


# -- the stage ----------------------------------------------------------------------------------------------------
@register_trainer("erm")
class ERMTrainer(Stage):
    """The apply stage's model, optimizer and step: (CMW-weighted) ERM, optionally in the soft-label form.

    Another apply trainer (``OLTRTrainer``) subclasses it to change the model and the step, and inherits data,
    weighting, evaluation and the engine's loop, checkpoints and metrics. Its own hooks: :meth:`build_model`,
    :meth:`make_optimizer`, :meth:`make_stepper`, :meth:`prepare_epoch`, :meth:`weighted`, :meth:`epoch_fields`,
    :meth:`evaluate_open`.
    """

    kind = "apply"
    first_epoch = 1
    state_keys = ("model", "optimizer", "scheduler", "scaler", "soft", "best")
    summary_name = SUMMARY_NAME

    def __init__(self, s: RunSetup) -> None:
        self.s = s
        cfg = s.cfg
        self.ctx, self.out, self.seed, self.progress, self.batch_size = s.ctx, s.out, cfg.seed, cfg.progress, \
            cfg.batch_size
        self.log = tuple(cfg.log)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        self.model = self.build_model().to(s.ctx.device)
        self.loader = s.train_loader
        self.optimizer, self.scheduler = self.make_optimizer()
        self.soft = None
        if cfg.soft_labels:
            self.soft = SoftLabelState(self.model, s.train_ds.targets, s.num_classes, device=s.ctx.device,
                                       decay=cfg.teacher_decay, alpha=cfg.mixup_alpha, batch_size=cfg.batch_size)
        self.stepper: ApplyStepper | None = None
        self.best: dict[str, Any] = {"top1": None, "epoch": None}
        self.final_eval: dict[str, Any] = {}
        self.range_warned = False
        self.warned: set[str] = set()
        self.per_class: dict[str, list[float | None] | None] = {}
        self.gate = self.make_gate()
        self.trust: dict[str, Any] | None = None  # the trust check's verdict, once it ran
        self.is_weighted = False
        self.last_shape: tuple[int, ...] | None = None
        self.seen = 0

    @classmethod
    def from_config(cls, cfg: ApplyConfig, ctx: DistributedContext) -> ERMTrainer:
        """The memory check of one step (before any data), then the run's shared setup."""
        if (cfg.weighting != "none" and cfg.warmup_epochs != "auto" and cfg.warmup_epochs >= max(cfg.stage_epochs())
                and ctx.is_main):
            warnings.warn(f"--warmup-epochs {cfg.warmup_epochs} covers every epoch (--epochs {cfg.epochs}): the run "
                          f"is plain cross-entropy and the {cfg.weighting} weighting is never applied", stacklevel=2)
        check_memory(cfg, ctx.device)
        return cls(build_setup(cfg, ctx))

    # -- the trainer's own hooks --------------------------------------------------------------------------------------
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
            steps_per_epoch=len(self.loader), decay_milestones=cfg.decay_milestones)

    def wrap(self, module: nn.Module) -> nn.Module:
        ctx = self.s.ctx
        if not ctx.enabled:
            return module
        return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def make_stepper(self, module: nn.Module) -> ApplyStepper:
        s = self.s
        return ApplyStepper(module, self.optimizer, self.scheduler, criterion=s.criterion, amp_dtype=s.amp_dtype,
                            scaler=s.scaler, soft=self.soft, is_clean=s.is_clean, ctx=s.ctx)

    def prepare_epoch(self, epoch: int) -> str:
        """Before every epoch (a stage switch, say); returns a note for the progress bar."""
        return ""

    def make_gate(self) -> WarmupGate:
        """The warm-up: a fixed count, or ``auto`` (the frozen net's readiness; no warm-up for fixed weightings)."""
        cfg, s = self.s.cfg, self.s
        if cfg.warmup_epochs != "auto":
            return WarmupGate(int(cfg.warmup_epochs), cfg.total_epochs())
        if not isinstance(s.criterion, CMWLoss):
            return WarmupGate(0, cfg.total_epochs())
        return WarmupGate("auto", cfg.total_epochs(), s.criterion.reference_weight())

    def weighted(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) uses the net's weights: after the plain-CE warm-up (see :meth:`make_gate`)."""
        return self.gate.applies(epoch + 1)

    def epoch_fields(self) -> dict[str, Any]:
        return {}

    def evaluate_open(self) -> dict[str, Any]:
        """Open-set metrics, rejecting by reachability to the class means of the training features."""
        return self.open_set_metrics(None)

    def open_set_metrics(self, centroids: torch.Tensor | None) -> dict[str, Any]:
        """The test split (known) and the open set (unknown) against ``centroids`` (None: the class means of the
        model's training features)."""
        s = self.s
        self.model.eval()
        if centroids is None:
            centroids, _ = class_centroids(lambda x: features_and_logits(self.model, x)[0],
                                           train_view_loader(s.train_ds, s.cfg, s.ctx), s.ctx, s.num_classes,
                                           s.amp_dtype)
        return evaluate_open_set(self.model, s.eval_loaders[0][1], s.open_loader, centroids, s.counts, s.ctx, s.cfg,
                                 s.amp_dtype)

    # -- engine hooks -------------------------------------------------------------------------------------------------
    def total_epochs(self) -> int:
        return self.s.cfg.total_epochs()

    def fingerprint(self) -> str:
        return self.s.cfg.fingerprint()

    def identity(self) -> dict[str, Any]:
        return dict(self.s.net_identity)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.s.scaler.state_dict() if self.s.scaler is not None else None,
            "soft": self.soft.state_dict() if self.soft is not None else None,
            "gate": self.gate.state_dict(),
            "trust": self.trust,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.s.scaler is not None and state.get("scaler"):
            self.s.scaler.load_state_dict(state["scaler"])
        if self.soft is not None:
            self.soft.load_state_dict(state["soft"])
        self.best = {"top1": state["best"]["top1"], "epoch": state["best"]["epoch"]}
        if isinstance(state.get("gate"), dict):
            self.gate.load_state_dict(state["gate"])
        self.trust = state.get("trust")

    def start(self, epoch: int) -> None:
        """Wrap for DDP and build the step, continuing the lr schedule at ``epoch``."""
        self.stepper = self.make_stepper(self.wrap(self.model))
        self.stepper.num_updates = epoch * len(self.loader)

    def write_start_files(self, start_epoch: int, resumed: bool) -> None:
        s, cfg = self.s, self.s.cfg
        if not resumed:
            write_json(s.out / CONFIG_NAME, {**cfg.to_dict(), "fingerprint": cfg.fingerprint(),
                                             "world_size": s.ctx.world_size,
                                             "labels_digest": s.train_ds.labels_digest()})
        if s.families is not None:
            write_json(s.out / FAMILIES_NAME, s.families)
        describe_start(s, start_epoch)

    def begin_epoch(self, epoch: int) -> str:
        note = self.prepare_epoch(epoch)
        self.is_weighted = self.weighted(epoch)
        assert self.stepper is not None
        self.stepper.reset_stats()
        self.stepper.observe_unweighted = not self.is_weighted and self.gate.start_epoch is None
        self.stepper.observe_trust = self.trust_due()
        if self.stepper.observe_trust:  # judged on one epoch's weights: the one before the net is applied
            assert isinstance(self.s.criterion, CMWLoss)
            self.s.criterion.trust_monitor.reset()
        self.seen, self.last_shape = 0, None
        return note + ("" if self.is_weighted else " (CE warm-up)")

    def seed_epoch(self, epoch: int) -> None:
        super().seed_epoch(epoch)
        if self.soft is not None:
            self.soft.rng = np.random.default_rng(derive_seed(self.seed, epoch, self.ctx.rank, 1))

    def train_loader(self) -> Any:
        return self.loader

    def train_step(self, step: int, batch: Any) -> int:
        stepper, device = self.stepper, self.ctx.device
        assert stepper is not None
        x, y, idx = batch
        if y.numel() == 0:  # every image of the batch was unreadable
            if self.ctx.enabled and self.last_shape is not None:
                stepper.null_step(self.last_shape)  # the other ranks wait for this rank's gradients
            return 0
        self.last_shape = tuple(x.shape)
        stepper(x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx.to(device, non_blocking=True),
                self.is_weighted)
        self.seen += y.shape[0]
        return int(y.shape[0])

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        s, ctx, stepper = self.s, self.ctx, self.stepper
        assert stepper is not None
        row: dict[str, Any] = {"weighted": bool(self.is_weighted and s.criterion is not None),
                               "lr": float(self.optimizer.param_groups[0]["lr"])}
        row.update(self.epoch_fields())
        row.update(stepper.epoch_stats(ctx))
        row["images_per_s"] = float(ctx.all_reduce_sum(self.seen / max(seconds, 1e-9)).item())
        if s.net is not None:
            row.update(self.guard_report(epoch, row))
        return row

    def guard_report(self, epoch: int, row: dict[str, Any]) -> dict[str, Any]:
        """The frozen net's guards at the end of an epoch: the warm-up decision (the stage's gate), then what the
        criterion's monitors saw (:meth:`CMWLoss.end_epoch`: loss range, starved classes, a weight that rises with
        the loss). Every number is reduced over the ranks."""
        out: dict[str, Any] = {}
        trust_due = self.trust_due()
        if not self.is_weighted:
            self.gate.observe_mean(row.get("would_be_mean_weight"))
            self.gate.end_epoch(epoch + 1)
            if self.gate.start_epoch is not None:
                out["warmup_start_epoch"] = self.gate.start_epoch
            if trust_due and self.gate.start_epoch == epoch + 2:  # the next epoch would be weighted
                out.update(self.check_trust(epoch))
            return out
        if trust_due:  # no warm-up epoch before this one: judged on the first weighted epoch
            out.update(self.check_trust(epoch))
        assert isinstance(self.s.criterion, CMWLoss)
        report = self.s.criterion.end_epoch()
        out.update({k: v for k, v in report.items() if k.startswith(("loss_range_check", "frac_"))})
        starved = report["starved_classes"]
        means = [m for m in report["class_mean_weight"] if m is not None]
        if means:
            out["min_class_mean_weight"] = min(means)
        out["starved_classes"] = starved
        out["weight_loss_cov"] = report["weight_loss_cov"]
        frac = out.get("frac_outside_range")
        if frac is not None and frac > RANGE_TOLERANCE:
            low, high = range_bounds(self.s.net.loss_range)
            self._warn_once("range", f"epoch {epoch + 1}: {100 * frac:.1f}% of the losses the net sees lie outside "
                                     f"the loss range it was meta-trained on [{low:.3g}, {high:.3g}] "
                                     f"({describe_range_sides(out)}); its weights there are extrapolated")
        if out.get("loss_range_check") == "unchecked":
            self._warn_once("unchecked", "the net records no loss range: whether the target's losses are in its "
                                         "regime is unchecked")
        if starved:
            self._warn_once("starved", f"epoch {epoch + 1}: class(es) {starved[:20]} get a mean weight below "
                                       f"{STARVED_FRACTION:.0%} of the median class's (--min-class-weight "
                                       f"{self.s.cfg.min_class_weight:g} is the floor)")
        if (out.get("weight_loss_cov") or 0.0) > 0:
            self._warn_once("trend", f"epoch {epoch + 1}: inside its classes the net gives higher weights to higher "
                                     "losses on this target: it takes them for clean samples, a regime it was not "
                                     "trained for (a long tail with little noise?); compare with --weighting "
                                     "class-balanced")
        return out

    def trust_due(self) -> bool:
        return self.s.net is not None and self.trust is None and self.s.cfg.trust_check != "off"

    def check_trust(self, epoch: int) -> dict[str, Any]:
        """The trust check (:meth:`CMWLoss.trust`) on the epoch's raw weights; under ``--trust-check fallback`` a
        distrusted net is never applied again (plain CE)."""
        s = self.s
        assert isinstance(s.criterion, CMWLoss)
        verdict = s.criterion.trust(s.counts.tolist())
        verdict["epoch"] = epoch + 1
        if verdict["verdict"] == "distrust":
            fallback = s.cfg.trust_check == "fallback"
            verdict["action"] = "fallback" if fallback else "warned"
            self.gate.disabled = fallback
            then = ("the rest of the run trains plain cross-entropy (--trust-check warn weights anyway)" if fallback
                    else "weighting anyway (--trust-check warn)")
            self._warn_once("trust", f"trust check after epoch {epoch + 1}: the frozen net does not suit this target "
                                     f"({'; '.join(verdict['reasons'])}); {then}; compare with --weighting "
                                     "class-balanced")
        self.trust = verdict
        return {"trust": verdict["verdict"], "trust_class_ratio": verdict.get("class_ratio")}

    def _warn_once(self, key: str, message: str) -> None:
        if self.ctx.is_main and key not in self.warned:
            warnings.warn(message, stacklevel=3)
            self.warned.add(key)

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        s = self.s
        if not (last or (epoch + 1) % s.cfg.eval_every == 0):
            return {}
        row: dict[str, Any] = {}
        sync_buffers(self.model, self.ctx)
        for label, loader in s.eval_loaders:
            res = evaluate_sharded(self.model, loader, self.ctx, s.num_classes, s.counts, s.amp_dtype)
            self.per_class[label] = res.pop("per_class_top1", None)  # summary.json, not every metrics row
            row.update({f"{label}_{k}": v for k, v in res.items()})
        if s.open_loader is not None:
            row.update({f"open_{k}": v for k, v in self.evaluate_open().items()})
        self.final_eval = dict(row)
        top1 = row.get("test_top1")
        if top1 is not None and (self.best["top1"] is None or top1 > self.best["top1"]):
            self.best = {"top1": top1, "epoch": epoch + 1}
            if self.ctx.is_main:
                save_classifier(self.model, s.out / BEST_CLASSIFIER_NAME)
        return row

    def epoch_line(self, row: dict[str, Any]) -> str:
        return epoch_line(row)

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        if self.ctx.is_main:
            save_classifier(self.model, self.out / CLASSIFIER_NAME)
            if rows:
                cfg = self.s.cfg
                plot_training(rows, self.out / TRAINING_PLOT_NAME,
                              f"{cfg.trainer} / {cfg.weighting} on {cfg.dataset} ({cfg.model})")
        result = summary(self.s, self.final_eval, self.best, rows, seconds)
        result["warmup_start_epoch"] = self.gate.start_epoch
        result["trust"] = self.trust
        per_class = self.per_class.get("test")
        if per_class:
            result["test_per_class_top1"] = per_class
            trained = self.s.counts > 0  # a class without training samples is never learnt: not the news
            scored = [(acc, c) for c, acc in enumerate(per_class) if acc is not None and trained[c]]
            acc, worst = min(scored or [(acc, c) for c, acc in enumerate(per_class) if acc is not None])
            result["worst_class"] = {"class": worst, "top1": acc}
            if self.ctx.is_main:  # also under --no-progress: only the bar goes
                progress_write(f"worst class: {worst} at {acc:.1f}% test top-1")
        return result

"""The apply (meta-test) stage, ``erm``: ERM training of any timm backbone with a frozen weighting net.

Per run: re-cluster the *target's* class counts into the net's K families (head ``i`` = ``i``-th smallest center,
the same code as the artifact), then train with ``w = V(CE.detach(), family[y])`` as per-sample coefficients
(``--weighting cmw``) or plain CE (``--weighting none``, the ERM baseline through the same pipeline). The first
``warmup_epochs`` are plain CE, as in the paper. ``soft_labels`` switches to the CMW-Net-SL form (mixup, EMA
teacher, pseudo-labels) of the authors' WebVision transfer.

The run's shared inputs (data, loaders, families, criterion, AMP) are built once in :func:`build_setup`; the stage
(:class:`ERMTrainer`) adds the model, optimizer and step, and :class:`~cmw_transfer.trainer.engine.Engine` runs
the epochs (resume, checkpoints, metrics, signals). ``trainer="oltr"`` selects another registered stage
(:mod:`cmw_transfer.trainer.oltr`) through :func:`~cmw_transfer.trainer.registry.create_trainer`; this module
never imports it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.atomic import write_json
from cmw_transfer.baselines import ClassBalancedWeighting, FocalWeighting
from cmw_transfer.errors import UserError
from cmw_transfer.guards import STARVED_FRACTION, WarmupGate, describe_range_sides, reference_weight
from cmw_transfer.progress import progress_write
from cmw_transfer.trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint, state_digest
from cmw_transfer.trainer.common import DistributedContext, create_optimizer_and_scheduler, derive_seed, make_loader
from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.trainer.data import check_model_name, load_datasets
from cmw_transfer.trainer.engine import Engine, Stage
from cmw_transfer.trainer.evaluation import amp_setup, evaluate_sharded, sync_buffers
from cmw_transfer.trainer.families import RANGE_TOLERANCE, target_families
from cmw_transfer.trainer.openset import evaluate_open_set, prepare_open_set
from cmw_transfer.trainer.registry import create_trainer, register_trainer
from cmw_transfer.trainer.report import plot_training
from cmw_transfer.trainer.rundir import RunDirectory
from cmw_transfer.trainer.steps import ApplyStepper, Criterion, SoftLabelState
from cmw_transfer.weighting import CMWLoss

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


def artifact_identity(spec: str, net: CMWNet) -> dict[str, Any]:
    """The net's content digest (and the hub commit it resolved to): a resume must find the same net."""
    identity: dict[str, Any] = {"weights digest": state_digest(net, net.config())}
    if spec.startswith("hub:"):
        identity["weights revision"] = _hub_revision(spec)
    return identity


def _hub_revision(spec: str) -> str | None:
    """The commit of the cached snapshot the spec resolved to (None when it cannot be told offline)."""
    try:
        from huggingface_hub import hf_hub_download

        from cmw_transfer.artifact.fileformat import WEIGHTS_NAME
        from cmw_transfer.weights.spec import parse_weights_spec

        parsed = parse_weights_spec(spec)
        path = Path(hf_hub_download(parsed.target, WEIGHTS_NAME, revision=parsed.revision, local_files_only=True))
    except Exception:  # the digest still identifies the net
        return None
    return path.parent.name if path.parent.parent.name == "snapshots" else None


# -- the shared setup ---------------------------------------------------------------------------------------------
@dataclass
class RunSetup:
    """What every apply trainer shares: data and loaders, the frozen net's criterion and families, AMP, the run dir."""

    cfg: ApplyConfig
    ctx: DistributedContext
    out: Path
    net: CMWNet | None
    net_identity: dict[str, Any]
    families: dict[str, Any] | None
    criterion: Criterion | None
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


def build_setup(cfg: ApplyConfig, ctx: DistributedContext) -> RunSetup:
    from cmw_transfer.models import input_geometry

    check_model_name(cfg.model)
    curvenet = _curvenet(cfg)
    # --weighting none ignores --weights, so the baseline is the same command with one option changed
    net = CMWNet.from_pretrained(cfg.weights) if cfg.weights and cfg.weighting == "cmw" and curvenet is None \
        else None
    if net is not None and cfg.families is not None and cfg.families != net.num_heads:
        target_families(net, np.zeros(0), cfg.families)  # raises the K mismatch before data is loaded

    with warnings.catch_warnings():
        if not ctx.is_main:  # the empty-classes warning once, not once per rank
            warnings.simplefilter("ignore")
        train_ds, eval_sets = load_datasets(cfg)
    open_ds = None
    if cfg.open_classes or cfg.open_dataset or cfg.dataset.strip() == "imagenet-lt":
        train_ds, eval_sets, open_ds = prepare_open_set(cfg, train_ds, eval_sets)
    counts = train_ds.class_counts()
    num_classes = int(train_ds.num_classes)
    if int((counts > 0).sum()) < 2:
        raise UserError(f"the training set has {int((counts > 0).sum())} class(es) with samples: a classifier "
                        "needs at least 2; check --dataset / --noise / --imbalance")

    families = None
    criterion: Criterion | None = None
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
        criterion = CMWLoss(net, families["family_of_class"], cfg.normalization,
                            min_class_weight=cfg.min_class_weight).to(device)
    elif curvenet is not None:
        from cmw_transfer.trainer.loss_curves import curve_criterion, probe_hint_for

        criterion = curve_criterion(curvenet, cfg.curves, train_ds, cfg.normalization,
                                    probe_hint_for(cfg, curvenet)).to(device)
    elif cfg.weighting == "focal":
        criterion = FocalWeighting(cfg.focal_gamma, cfg.normalization).to(device)
    elif cfg.weighting == "class-balanced":
        criterion = ClassBalancedWeighting(counts, cfg.cb_beta, cfg.normalization).to(device)
    elif cfg.weighting == "eql":
        from cmw_transfer.eql import EQLWeighting

        criterion = EQLWeighting(counts, cfg.eql_threshold, cfg.eql_rho).to(device)

    def loader(ds: Any, train: bool) -> Any:
        return make_loader(ds, cfg.batch_size, train=train, workers=cfg.workers, seed=cfg.seed,
                           distributed=ctx.enabled)

    amp_dtype, scaler = amp_setup(cfg.amp, device)
    is_clean = None
    if train_ds.clean_targets is not None:
        is_clean = torch.as_tensor(train_ds.targets == train_ds.clean_targets, device=device)
    identity = artifact_identity(str(cfg.weights), net) if net is not None else {}
    if curvenet is not None:
        identity = {"weights digest": state_digest(curvenet, curvenet.config())}
    return RunSetup(cfg=cfg, ctx=ctx, out=Path(cfg.out), net=net,
                    net_identity=identity,
                    families=families, criterion=criterion,
                    train_ds=train_ds, eval_sets=eval_sets, open_ds=open_ds, counts=counts, num_classes=num_classes,
                    in_chans=input_geometry(getattr(train_ds, "input_shape", (3, 0, 0)), cfg.img_size)[0],
                    train_loader=loader(train_ds, True),
                    eval_loaders=[(label, loader(ds, False)) for label, ds in eval_sets],
                    open_loader=loader(open_ds, False) if open_ds is not None else None, amp_dtype=amp_dtype,
                    scaler=scaler, is_clean=is_clean)


def _curvenet(cfg: ApplyConfig) -> Any:
    """The CurveNet of ``--weights`` (None for a CMW-Net); ``--curves`` without one is a user error."""
    from cmw_transfer.artifact.curvenet import CurveNet, artifact_method

    if cfg.weights and cfg.weighting == "cmw" and artifact_method(cfg.weights) == "curvenet":
        return CurveNet.from_pretrained(cfg.weights)
    if cfg.curves:
        raise UserError("--curves is read by a CurveNet only: give --weights a CurveNet artifact (metatrain "
                        "--method curvenet --curvenet-mode transferable), or drop --curves")
    return None


def run_apply(cfg: ApplyConfig) -> dict[str, Any]:
    """Train, evaluate, write the run directory; returns the summary (every rank gets it)."""
    cfg.validate()
    RunDirectory(cfg.out, "apply", resume=cfg.resume, overwrite=cfg.overwrite).check()  # before any work
    if (cfg.weighting != "none" and cfg.warmup_epochs != "auto" and cfg.warmup_epochs >= max(cfg.stage_epochs())
            and os.environ.get("RANK", "0") == "0"):
        warnings.warn(f"--warmup-epochs {cfg.warmup_epochs} covers every epoch (--epochs {cfg.epochs}): the run is "
                      f"plain cross-entropy and the {cfg.weighting} weighting is never applied", stacklevel=2)
    # a checkpoint of another configuration is refused before any data or model is loaded
    state = load_checkpoint(Path(cfg.out) / CHECKPOINT_NAME, cfg.fingerprint(), cfg) if cfg.resume else None
    ctx = DistributedContext.from_env(cfg.device)
    try:
        check_memory(cfg, ctx.device)  # before any data is loaded
        engine = Engine(create_trainer(cfg.trainer, build_setup(cfg, ctx)), resume=cfg.resume,
                        overwrite=cfg.overwrite)
        if state is not None:
            engine.restore(state)
        return engine.run()
    finally:
        ctx.teardown()


def check_memory(cfg: ApplyConfig, device: torch.device) -> None:
    """Refuse a step that cannot fit in memory (:mod:`cmw_transfer.trainer.memory`); CPU ranks of one machine
    share its memory."""
    from cmw_transfer.models import create_model
    from cmw_transfer.trainer.memory import check_step_fits, planned_geometry

    geometry = planned_geometry(cfg.dataset, cfg.img_size)
    if geometry is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    check_step_fits(lambda: create_model(cfg.model, num_classes=2, in_chans=geometry[0], img_size=cfg.img_size),
                    cfg.model, geometry, cfg.batch_size, device, processes=processes, half_precision=cfg.amp)


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
        self.is_weighted = False
        self.last_shape: tuple[int, ...] | None = None
        self.seen = 0

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
        return ApplyStepper(module, self.optimizer, self.scheduler, criterion=s.criterion,
                            normalization=s.cfg.normalization, device=s.ctx.device, amp_dtype=s.amp_dtype,
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
        reference = reference_weight(s.criterion.net, s.criterion.net.loss_range, s.criterion.family_of_class)
        return WarmupGate("auto", cfg.total_epochs(), reference)

    def weighted(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) uses the net's weights: after the plain-CE warm-up (see :meth:`make_gate`)."""
        return self.gate.applies(epoch + 1)

    def epoch_fields(self) -> dict[str, Any]:
        return {}

    def evaluate_open(self) -> dict[str, Any]:
        """Open-set metrics, rejecting by reachability to the class means of the training features."""
        return evaluate_open_set(self.s, self.model, centroids=None)

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
        _describe_start(s, start_epoch)

    def begin_epoch(self, epoch: int) -> str:
        note = self.prepare_epoch(epoch)
        self.is_weighted = self.weighted(epoch)
        assert self.stepper is not None
        self.stepper.reset_stats()
        self.stepper.observe_unweighted = not self.is_weighted and self.gate.start_epoch is None
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
            row.update(self.guard_report(epoch, row, stepper))
        return row

    def guard_report(self, epoch: int, row: dict[str, Any], stepper: ApplyStepper) -> dict[str, Any]:
        """The frozen net's guards at the end of an epoch (cmw_transfer.guards): warm-up decision, loss range,
        starved classes, a weight that rises with the loss. Every number is reduced over the ranks."""
        out: dict[str, Any] = {}
        if not self.is_weighted:
            self.gate.observe_mean(row.get("would_be_mean_weight"))
            self.gate.end_epoch(epoch + 1)
            if self.gate.start_epoch is not None:
                out["warmup_start_epoch"] = self.gate.start_epoch
            return out
        out.update(stepper.range_monitor.report())
        stepper.class_monitor.reduce()
        starved = stepper.class_monitor.starved()
        means = [m for m in stepper.class_monitor.class_means() if m is not None]
        if means:
            out["min_class_mean_weight"] = min(means)
        out["starved_classes"] = starved
        out["weight_loss_cov"] = stepper.class_monitor.within_class_cov()
        frac = out.get("frac_outside_range")
        if frac is not None and frac > RANGE_TOLERANCE:
            low, high = stepper.range_monitor.low, stepper.range_monitor.high
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
        return _epoch_line(row)

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        if self.ctx.is_main:
            save_classifier(self.model, self.out / CLASSIFIER_NAME)
            if rows:
                cfg = self.s.cfg
                plot_training(rows, self.out / TRAINING_PLOT_NAME,
                              f"{cfg.trainer} / {cfg.weighting} on {cfg.dataset} ({cfg.model})")
        summary = _summary(self.s, self.final_eval, self.best, rows, seconds)
        summary["warmup_start_epoch"] = self.gate.start_epoch
        per_class = self.per_class.get("test")
        if per_class:
            summary["test_per_class_top1"] = per_class
            trained = self.s.counts > 0  # a class without training samples is never learnt: not the news
            scored = [(acc, c) for c, acc in enumerate(per_class) if acc is not None and trained[c]]
            acc, worst = min(scored or [(acc, c) for c, acc in enumerate(per_class) if acc is not None])
            summary["worst_class"] = {"class": worst, "top1": acc}
            if self.ctx.is_main:  # also under --no-progress: only the bar goes
                progress_write(f"worst class: {worst} at {acc:.1f}% test top-1")
        return summary


# -- console and summary ------------------------------------------------------------------------------------------
def _summary(s: RunSetup, final_eval: dict[str, Any], best: dict[str, Any], rows: list[dict[str, Any]],
             seconds: float) -> dict[str, Any]:
    cfg = s.cfg
    if not final_eval and rows:  # resumed after the last epoch: report what the log holds
        labels = ("test", "open", *(item.partition("=")[0] for item in cfg.extra_eval))
        final_eval = {k: v for k, v in rows[-1].items() if k.split("_", 1)[0] in labels}
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return {
        "out": str(s.out),
        "dataset": cfg.dataset,
        "model": cfg.model,
        "weighting": cfg.weighting,
        "soft_labels": cfg.soft_labels,
        "weights": cfg.weights,
        "trainer": cfg.trainer,
        "epochs": cfg.total_epochs(),
        "world_size": s.ctx.world_size,
        "final": final_eval,
        "best_test_top1": best["top1"],
        "best_epoch": best["epoch"],
        "families_per_head": s.families["classes_per_head"] if s.families else None,
        "images_per_s": float(np.median(speeds)) if speeds else None,
        "seconds_this_session": seconds,
    }


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




def _describe_start(s: RunSetup, start_epoch: int) -> None:
    cfg, ctx, train_ds, families, net = s.cfg, s.ctx, s.train_ds, s.families, s.net
    noise = train_ds.noise_rate() if hasattr(train_ds, "noise_rate") else None
    realised = f", realised noise {100 * noise:.1f}%" if noise is not None else ""
    progress_write(f"apply: {train_ds.describe()}{realised}; model {cfg.model}; trainer {cfg.trainer}; "
                   f"weighting {cfg.weighting}{' + soft labels' if cfg.soft_labels else ''}; "
                   f"world size {ctx.world_size}; device {ctx.device}")
    if families is not None and net is not None:
        progress_write(f"families: centers {[round(c, 1) for c in families['centers']]} -> classes per head "
                       f"{families['classes_per_head']} (source centers {net.centers})")
    if start_epoch:
        progress_write(f"resuming after epoch {start_epoch}")
    if s.open_ds is not None:
        held = f" (held-out classes {list(cfg.open_classes)})" if cfg.open_classes else ""
        progress_write(f"open set: {len(s.open_ds)} unknown samples{held}, rejected below the reachability "
                       + (f"{cfg.open_threshold}" if cfg.open_threshold is not None else
                          f"accepting {100 * cfg.open_accept:g}% of the known test samples"))

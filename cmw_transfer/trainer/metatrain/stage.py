"""The meta-train stage (``metatrain``: cmwnet / mwnet / cmwnet-sl): learn the weighting net on a biased source
and write it as an artifact.

Per iteration: one training forward (shared), a meta step every ``meta_interval`` iterations after the CE
warm-up (:func:`cmw_transfer.trainer.meta.metastep.meta_gradient`), then the real step on the weighted loss with the
updated net. Every epoch (run by :class:`~cmw_transfer.trainer.engine.loop.Engine`): metrics line, checkpoint
(atomic), and for lowest-loss/GMM meta sets a rebuilt meta set. All randomness of an epoch is derived from
``(seed, epoch)``, so ``--resume`` continues exactly; the checkpoint also holds the loss range the export needs,
so a run killed during its export re-exports the identical net, and a finished run has nothing to resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.artifact.curves import family_names, plot_curves
from cmw_transfer.artifact.fileformat import WEIGHTS_NAME
from cmw_transfer.artifact.net import CMWNet, loss_range_of
from cmw_transfer.artifact.scales import fit_families
from cmw_transfer.atomic import write_json
from cmw_transfer.dataset import resolve_source
from cmw_transfer.defaults import __version__
from cmw_transfer.errors import UserError
from cmw_transfer.metrics import clean_noisy_auc, evaluate
from cmw_transfer.models import create_model
from cmw_transfer.trainer.config import MetaTrainConfig, parse_meta_set
from cmw_transfer.trainer.data import load_source
from cmw_transfer.trainer.engine.checkpoint import CHECKPOINT_NAME
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.loaders import derive_seed, make_loader
from cmw_transfer.trainer.engine.loop import Stage
from cmw_transfer.trainer.engine.memory import check_model_fits
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler
from cmw_transfer.trainer.engine.registry import register_trainer
from cmw_transfer.trainer.meta.metasets import MetaSet
from cmw_transfer.trainer.meta.metastep import (
    MetaResult,
    VirtualStep,
    meta_gradient,
    meta_gradient_mode,
    virtual_step_from_optimizer,
)
from cmw_transfer.trainer.meta.objectives import TrainBatch, create_objective
from cmw_transfer.weighting.soft_labels import PseudoLabelBank, make_teacher, mix_inputs, sample_mixup, teacher_probs

RUN_NAME = "run.json"
EXPORT_FILES = (WEIGHTS_NAME, "config.json", "README.md", "curves.png")  # written by export(), in this order


@register_trainer("metatrain")
class MetaTrainer(Stage):
    """The meta-train stage over a biased source (one process): the classifier, the meta-model and its meta step."""

    kind = "metatrain"
    distributed = False
    first_epoch = 1  # metrics.jsonl, the checkpoint and the messages count epochs from 1, as apply does
    legacy_first_epoch = 0  # checkpoints written before they recorded their origin counted from 0 (translated)
    state_keys = ("updates", "model", "wnet", "optimizer", "wnet_optimizer", "teacher", "meta_indices",
                  "loss_range")

    def __init__(self, cfg: MetaTrainConfig, ctx: DistributedContext) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.out, self.progress = Path(cfg.out), cfg.progress
        self.seed, self.batch_size = cfg.seed, cfg.batch_size
        self.log = tuple(cfg.log)
        spec = parse_meta_set(cfg.meta_set)
        torch.manual_seed(cfg.seed)
        self.check_memory()  # before any data is loaded
        self.data = load_source(cfg.src, cfg.data_dir, cfg.noise, cfg.imbalance, seed=cfg.seed, meta=spec,
                                eval_dataset=cfg.eval_dataset)
        train = self.data.train
        self.num_classes = train.num_classes
        self.class_counts = train.class_counts()
        centers, families = fit_families(self.class_counts, cfg.families)
        self.centers = centers
        self.family_of_class = torch.as_tensor(families, dtype=torch.long, device=self.device)
        sample_shape = tuple(train[0][0].shape)  # a model that cannot take it is one line here, before any file
        self.model = create_model(cfg.model, self.num_classes, sample_shape[0],
                                  input_size=sample_shape[1:], resizable=False).to(self.device)
        self.wnet, self.objective = self.build_meta_model()
        self.loader = make_loader(train, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                                  distributed=False)
        self.eval_train_loader = make_loader(train, 512, train=False, workers=cfg.workers, seed=cfg.seed,
                                             distributed=False)
        self.test_loader = None if self.data.test is None else make_loader(
            self.data.test, 512, train=False, workers=cfg.workers, seed=cfg.seed, distributed=False)
        self.optimizer, self.scheduler = self.make_optimizer()
        self.wnet_optimizer = torch.optim.Adam(self.wnet.parameters(), lr=cfg.meta_lr,
                                               weight_decay=cfg.meta_weight_decay)
        self.virtual, self.gates = meta_gradient_mode(self.model, cfg.meta_grad, cfg.famus_active, self.device)
        self.gate_optimizer = None if self.gates is None else torch.optim.SGD(self.gates.parameters(), lr=0.1,
                                                                              momentum=0.9)
        self.teacher = make_teacher(self.model, cfg.ema_decay)
        self.pseudo = PseudoLabelBank(train.targets, self.num_classes, device=self.device) \
            if cfg.method == "cmwnet-sl" else None
        self.meta = MetaSet(spec, train, self.data.clean_meta, self.device)
        self.updates = 0
        self.last_losses = np.zeros(0)  # per-sample losses of the last epoch: the artifact's loss range
        self.saved_loss_range: dict[str, float] | None = None

    def check_memory(self) -> None:
        """Refuse a meta step that cannot fit: the virtual step keeps the training batch's graph while the meta batch
        goes forward, so both count."""
        cfg = self.cfg
        check_model_fits(cfg.model, cfg.src, cfg.batch_size, self.device, extra_samples=cfg.meta_batch_size)

    def build_meta_model(self) -> tuple[Any, Any]:
        """The meta-model (in the ``wnet`` slot) and its objective; a stage extending this one overrides it (the
        advisor), or only :meth:`build_weighting_net` (CurveNet's allocate stage)."""
        cfg = self.cfg
        return self.build_weighting_net().to(self.device), create_objective(cfg.method, cfg.normalization)

    def build_weighting_net(self) -> torch.nn.Module:
        """The meta-learned net (called once the training data is loaded)."""
        return CMWNet(hidden_size=self.cfg.hidden_size, num_heads=self.cfg.families)

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        return create_optimizer_and_scheduler(
            self.model, opt="sgd", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            sched=cfg.sched, epochs=cfg.epochs, steps_per_epoch=len(self.loader))

    def meta_step_due(self, it: int) -> bool:
        """Whether iteration ``it`` of a weighted epoch runs a meta step."""
        return it % self.cfg.meta_interval == 0

    # -- engine hooks: identity and state -----------------------------------------------------------------------------
    def total_epochs(self) -> int:
        return self.cfg.epochs

    def fingerprint(self) -> str:
        return self.cfg.fingerprint()

    def identity(self) -> dict[str, Any]:
        """The lr schedule spans ``--epochs``: a resume with another value would train its extra epochs at lr 0."""
        return {"--epochs": self.cfg.epochs}

    def state_dict(self) -> dict[str, Any]:
        state = {
            "updates": self.updates, "loss_range": self.loss_range(),
            "model": self.model.state_dict(), "wnet": self.wnet.state_dict(),
            "optimizer": self.optimizer.state_dict(), "wnet_optimizer": self.wnet_optimizer.state_dict(),
            "teacher": self.teacher.module.state_dict(),
            "meta_indices": None if self.meta.indices is None else torch.as_tensor(self.meta.indices),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.gates is not None:
            state["gates"] = self.gates.state_dict()
            state["gate_optimizer"] = self.gate_optimizer.state_dict()
        if self.pseudo is not None:
            state["pseudo"] = self.pseudo.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.wnet.load_state_dict(state["wnet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.wnet_optimizer.load_state_dict(state["wnet_optimizer"])
        self.teacher.module.load_state_dict(state["teacher"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.gates is not None:
            self.gates.load_state_dict(state["gates"])
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        if self.pseudo is not None:
            self.pseudo.load_state_dict(state["pseudo"])
        if state["meta_indices"] is not None:
            self.meta.indices = state["meta_indices"].numpy()
        self.updates = int(state["updates"])
        self.saved_loss_range = {str(k): float(v) for k, v in dict(state["loss_range"]).items()}

    # -- engine hooks: the run ----------------------------------------------------------------------------------------
    def start(self, epoch: int) -> None:
        """A finished run whose export is complete has nothing to resume; one killed during its export re-exports."""
        if epoch >= self.cfg.epochs and all((self.out / name).is_file() for name in EXPORT_FILES):
            raise UserError(f"--resume: the run in {self.out} finished all {self.cfg.epochs} epochs and its net is "
                            f"exported ({WEIGHTS_NAME}): nothing to resume")

    def write_start_files(self, start_epoch: int, resumed: bool) -> None:
        write_json(self.out / RUN_NAME, {**self.cfg.to_dict(), "fingerprint": self.fingerprint(),
                                         "class_counts": self.class_counts.tolist(),
                                         "centers": self.centers.tolist(),
                                         "family_of_class": self.family_of_class.tolist(),
                                         "labels_digest": self.data.train.labels_digest()})

    def begin_epoch(self, epoch: int) -> str:
        cfg = self.cfg
        if epoch >= cfg.warmup_epochs and self.meta.spec.rebuilt_each_epoch:
            self.meta.rebuild(self.teacher.module, self.eval_train_loader, derive_seed(cfg.seed, epoch) % 2**32)
        self.model.train()
        self.is_weighted = epoch >= cfg.warmup_epochs
        n = len(self.data.train)
        self.last_weight, self.last_loss = np.full(n, np.nan), np.full(n, np.nan)
        self.sums = {"loss": 0.0, "meta_loss": 0.0, "steps": 0, "meta_steps": 0, "samples": 0}
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        return "" if self.is_weighted else " (CE warm-up)"

    def seed_epoch(self, epoch: int) -> None:
        self.gen = np.random.default_rng(derive_seed(self.cfg.seed, epoch, 1))
        torch.manual_seed(derive_seed(self.cfg.seed, epoch, 2))

    def train_loader(self) -> Any:
        return self.loader

    def weight_fn(self, loss: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        return self.wnet(loss, family)

    def train_step(self, it: int, batch: Any) -> int:
        x, y, idx = batch
        x, y = x.to(self.device), y.to(self.device)
        batch = self._train_batch(x, y, idx, self.gen, mix=self.is_weighted)
        logits = self.model(batch.x)
        terms = self.objective.terms(logits, batch)
        self.check_finite(terms, it)
        reused = None
        if self.is_weighted and self.meta_step_due(it):
            reused = self.meta_step(lambda meta_x, meta_y, step, momentum, reuse: meta_gradient(
                self.model, self.wnet, self.params, self.buffers, batch, meta_x, meta_y, self.objective, step,
                self.virtual, momentum_buffers=momentum, gates=self.gates, train_out=(logits, terms),
                keep_graph=not reuse))
        if self.is_weighted:
            with torch.no_grad():
                coeff = self.objective.coefficients(self.weight_fn, terms.detach(), batch)
                w = self.objective.weights(self.weight_fn, terms.detach(), batch)
            loss = (coeff * terms).sum()
            w_first = (w[:, 0] if w.dim() == 2 else w).cpu().numpy()
        else:
            loss = F.cross_entropy(logits, y)
            w_first = np.ones(len(y))
        self.actual_step(loss, reused, idx, terms[:, 0], w_first)
        return len(y)

    def check_finite(self, losses: torch.Tensor, it: int) -> None:
        """A diverged run stops here, its last checkpoint intact."""
        if not torch.isfinite(losses).all():
            raise UserError(f"non-finite training loss at epoch {self.epoch_label()}, iteration {it}: the run "
                            f"diverged; the last checkpoint ({self.out / CHECKPOINT_NAME}) is intact; lower "
                            "--lr/--meta-lr")

    def meta_step(self, gradient: Callable[..., MetaResult]) -> dict[str, torch.Tensor] | None:
        """One meta step: ``gradient(meta_x, meta_y, step, momentum_buffers, reuse)`` on a meta batch, the meta-model
        (and FaMUS's gates) updated; returns the training gradient the actual step reuses (``--actual-step reuse``)."""
        meta_x, meta_y = self.meta.batch(self.gen, self.cfg.meta_batch_size)
        step, momentum = self.virtual_step(self.params)
        reuse = self.cfg.actual_step == "reuse"
        result = gradient(meta_x, meta_y, step, momentum, reuse)
        self.apply_meta_result(result)
        self.sums["meta_loss"] += result.meta_loss
        self.sums["meta_steps"] += 1
        return result.train_grads if reuse else None

    def actual_step(self, loss: torch.Tensor, reused: dict[str, torch.Tensor] | None, idx: torch.Tensor,
                    losses: torch.Tensor, weights: np.ndarray | None = None) -> None:
        """The real step (the gradient the meta step computed at the net it started from, else a backward of
        ``loss``), the schedule, the teacher, and the epoch's records of the batch's losses (and weights)."""
        self.optimizer.zero_grad(set_to_none=True)
        if reused is None:
            loss.backward()
        else:
            for name, p in self.params.items():
                p.grad = reused[name]
        self.optimizer.step()
        self.updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.updates)
        self.teacher.update(self.model)
        rows = idx.numpy()
        if weights is not None:
            self.last_weight[rows] = weights
        self.last_loss[rows] = losses.detach().cpu().numpy()
        self.sums["loss"] += float(loss.detach()) * len(rows)
        self.sums["samples"] += len(rows)
        self.sums["steps"] += 1

    def epoch_label(self) -> int:
        """The epoch being trained, counted from 1 (as in metrics.jsonl)."""
        return int(self.updates // max(len(self.loader), 1)) + self.first_epoch

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: np.random.Generator,
                     mix: bool) -> TrainBatch:
        """CMW-Net-SL batches: pseudo-labels from the teacher on the un-mixed input, then mixup (not in warm-up)."""
        if self.pseudo is None:
            return TrainBatch(x, y, self.family_of_class)
        pseudo = self.pseudo.update(idx, teacher_probs(self.teacher, x))
        if not mix:  # the CE warm-up trains on the plain batch, as the authors' train_CE
            return TrainBatch(x, y, self.family_of_class, pseudo=pseudo)
        lam, perm = sample_mixup(len(y), self.cfg.mixup_alpha, gen, self.device)
        return TrainBatch(mix_inputs(x, lam, perm), y, self.family_of_class, pseudo=pseudo, lam=lam, perm=perm)

    def virtual_step(self, params: dict) -> tuple[Any, dict | None]:
        """The virtual step and its momentum buffers: plain SGD at the current lr, or the real optimizer mirrored."""
        if self.cfg.mirror_optimizer:  # the real optimizer's param groups, Nesterov, per-group weight decay, buffers
            return virtual_step_from_optimizer(self.optimizer, params)
        return VirtualStep(self.optimizer.param_groups[0]["lr"]), None

    def apply_meta_result(self, result: Any) -> None:
        """One optimizer step of the meta-model (and of FaMUS's gates) from a meta-gradient result."""
        self.wnet_optimizer.zero_grad(set_to_none=True)
        for name, p in self.wnet.named_parameters():
            p.grad = result.wnet_grads[name]
        self.wnet_optimizer.step()
        if self.gates is not None and result.gate_grads:
            self.gate_optimizer.zero_grad(set_to_none=True)
            for name, p in self.gates.named_parameters():
                p.grad = result.gate_grads.get(name)
            self.gate_optimizer.step()

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        weights, losses = self.last_weight, self.last_loss
        train = self.data.train
        fam = self.family_of_class.cpu().numpy()[train.targets]
        seen = ~np.isnan(weights)
        row = self.epoch_row(seconds)
        for k, name in enumerate(family_names(self.cfg.families)):
            mask = seen & (fam == k)
            row[f"weight_{name}"] = float(weights[mask].mean()) if mask.any() else None
        if train.clean_targets is not None and epoch >= self.cfg.warmup_epochs:
            auc = clean_noisy_auc(weights[seen], (train.targets == train.clean_targets)[seen])
            row["clean_noisy_auc"] = None if math.isnan(auc) else auc
        self.last_losses = losses[seen & np.isfinite(losses)]
        self.saved_loss_range = None
        return row

    def epoch_row(self, seconds: float) -> dict[str, Any]:
        """What every meta-train stage logs per epoch: loss, time, lr, meta steps and meta loss."""
        sums = self.sums
        return {"train_loss": sums["loss"] / max(sums["samples"], 1), "seconds": round(seconds, 3),
                "lr": self.optimizer.param_groups[0]["lr"], "meta_steps": sums["meta_steps"],
                "meta_loss": sums["meta_loss"] / sums["meta_steps"] if sums["meta_steps"] else None}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        if self.test_loader is None:
            return {}
        return {f"test_{k}": v for k, v in evaluate(self.model, self.test_loader, self.device).items()
                if k in ("top1", "top5")}

    def epoch_line(self, row: dict[str, Any]) -> str | None:
        if not self.progress:
            return None
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        return " ".join(f"{k}={v}" for k, v in shown.items())

    def loss_range(self) -> dict[str, float]:
        if self.last_losses.size == 0 and self.saved_loss_range is not None:  # restored: no epoch ran since
            return dict(self.saved_loss_range)
        return loss_range_of(self.last_losses)

    # -- the run and the export ---------------------------------------------------------------------------------------
    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        if not any(row.get("meta_steps") for row in rows):
            warnings.warn(f"the exported net never had a meta step (--warmup-epochs {self.cfg.warmup_epochs} >= "
                          f"--epochs {self.cfg.epochs}): its weights are its random initialisation", stacklevel=2)
        net = self.export()
        return {"out": str(self.out), "final": rows[-1] if rows else {}, "centers": net.centers,
                "loss_range": net.loss_range}

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """Where an exported net comes from: the source and its bias, the method's settings, the toolkit version."""
        cfg = self.cfg
        return {"source": cfg.src, "bias": str(resolve_source(cfg.src, cfg.noise, cfg.imbalance)[1]) or "none",
                "method": cfg.method, "backbone": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
                "meta_set": cfg.meta_set, "meta_grad": cfg.meta_grad, "toolkit_version": __version__, **extra}

    def export(self) -> CMWNet:
        cfg = self.cfg
        net = self.wnet.cpu().with_scales(self.centers.tolist(), self.loss_range())
        net.provenance = self.provenance(source_labels_digest=self.data.train.labels_digest())
        net.save_pretrained(self.out)
        plot_curves(net, self.out / "curves.png", title=f"{cfg.method} on {cfg.src}")
        self.wnet.to(self.device)
        return net

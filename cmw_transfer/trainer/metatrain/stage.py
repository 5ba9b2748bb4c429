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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.artifact.curves import family_names, plot_curves
from cmw_transfer.artifact.fileformat import WEIGHTS_NAME
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import fit_families
from cmw_transfer.atomic import write_json
from cmw_transfer.dataset import resolve_source
from cmw_transfer.defaults import __version__
from cmw_transfer.errors import UserError
from cmw_transfer.metrics import clean_noisy_auc, evaluate
from cmw_transfer.models import create_model
from cmw_transfer.trainer.config import MetaTrainConfig, parse_meta_grad, parse_meta_set
from cmw_transfer.trainer.data import load_source, stack_batch
from cmw_transfer.trainer.engine.checkpoint import CHECKPOINT_NAME
from cmw_transfer.trainer.engine.distributed import DistributedContext, resolve_device
from cmw_transfer.trainer.engine.loaders import derive_seed, make_loader
from cmw_transfer.trainer.engine.loop import Engine, Stage
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler
from cmw_transfer.trainer.engine.registry import register_trainer
from cmw_transfer.trainer.engine.rundir import RunDirectory
from cmw_transfer.trainer.meta.metasets import gmm_clean_indices, lowest_loss_indices, per_sample_losses
from cmw_transfer.trainer.meta.metastep import (
    FamusGates,
    VirtualStep,
    meta_gradient,
    virtual_names,
    virtual_step_from_optimizer,
)
from cmw_transfer.trainer.meta.objectives import TrainBatch, create_objective
from cmw_transfer.weighting.soft_labels import PseudoLabelBank, make_teacher, mix_inputs, sample_mixup, teacher_probs

RUN_NAME = "run.json"
EXPORT_FILES = (WEIGHTS_NAME, "config.json", "README.md", "curves.png")  # written by export(), in this order


@register_trainer("metatrain")
class MetaTrainer(Stage):
    """Stage hooks over a meta-train run; ``resume`` restores the checkpoint at construction (``start_epoch``)."""

    kind = "metatrain"
    first_epoch = 1  # metrics.jsonl, the checkpoint and the messages count epochs from 1, as apply does
    legacy_first_epoch = 0  # checkpoints written before they recorded their origin counted from 0 (translated)
    state_keys = ("updates", "model", "wnet", "optimizer", "wnet_optimizer", "teacher", "meta_indices",
                  "loss_range")

    def __init__(self, cfg: MetaTrainConfig, *, resume: bool = False, progress: bool = True,
                 overwrite: bool = False) -> None:
        cfg.validate()
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        RunDirectory(cfg.out, self.kind, resume=resume, overwrite=overwrite).check()  # before any work
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.ctx = DistributedContext(self.device)
        self.seed, self.batch_size = cfg.seed, cfg.batch_size
        self.log = tuple(cfg.log)
        self.meta_spec = parse_meta_set(cfg.meta_set)
        torch.manual_seed(cfg.seed)
        self.check_memory()  # before any data is loaded
        self.data = load_source(cfg, self.meta_spec)
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
        mode, skip = parse_meta_grad(cfg.meta_grad)
        try:
            self.virtual = virtual_names(self.model, mode, skip)
        except ValueError as exc:
            raise UserError(f"--meta-grad {cfg.meta_grad}: {exc}") from None
        self.gates = self.gate_optimizer = None
        if mode == "famus":
            params = dict(self.model.named_parameters())
            head = [n for n in self.virtual if n.startswith(self._classifier_prefix())]
            self.gates = FamusGates({n: params[n].shape for n in self.virtual}, always_on=head,
                                    target_active=cfg.famus_active).to(self.device)
            self.gate_optimizer = torch.optim.SGD(self.gates.parameters(), lr=0.1, momentum=0.9)
        self.teacher = make_teacher(self.model, cfg.ema_decay)
        self.pseudo = PseudoLabelBank(train.targets, self.num_classes, device=self.device) \
            if cfg.method == "cmwnet-sl" else None
        self.meta_indices = None if self.meta_spec.kind == "clean" else np.arange(0)
        self.start_epoch = 0
        self.updates = 0
        self.last_losses = np.zeros(0)  # per-sample losses of the last epoch: the artifact's loss range
        self.saved_loss_range: dict[str, float] | None = None
        self.engine = Engine(self, resume=resume, overwrite=overwrite)
        if resume:
            self.start_epoch = self.engine.restore()

    def check_memory(self) -> None:
        """Refuse a meta step that cannot fit (:mod:`cmw_transfer.trainer.engine.memory`): the virtual step keeps the
        training batch's graph while the meta batch goes forward, so both count."""
        from cmw_transfer.trainer.engine.memory import check_step_fits, planned_geometry

        cfg = self.cfg
        geometry = planned_geometry(cfg.src, None)
        if geometry is not None:
            check_step_fits(lambda: create_model(cfg.model, 2, geometry[0]), cfg.model, geometry, cfg.batch_size,
                            self.device, extra_samples=cfg.meta_batch_size)

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

    def _classifier_prefix(self) -> str:
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        for name, module in self.model.named_modules():
            if module is head:
                return name
        return list(dict(self.model.named_parameters()))[-1].rsplit(".", 1)[0]

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
            "meta_indices": None if self.meta_indices is None else torch.as_tensor(self.meta_indices),
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
            self.meta_indices = state["meta_indices"].numpy()
        self.updates = int(state["updates"])
        self.saved_loss_range = {str(k): float(v) for k, v in dict(state["loss_range"]).items()}

    # -- meta set ---------------------------------------------------------------------------------------------------
    def rebuild_meta_set(self, epoch: int) -> None:
        if self.meta_spec.kind == "clean":
            return
        losses = per_sample_losses(self.teacher.module, self.eval_train_loader, self.device, len(self.data.train))
        if self.meta_spec.kind == "lowest-loss":
            self.meta_indices = lowest_loss_indices(losses, self.data.train.targets, self.num_classes,
                                                    self.meta_spec.per_class)
        else:
            self.meta_indices = gmm_clean_indices(losses, seed=derive_seed(self.cfg.seed, epoch) % 2**32)
        if self.meta_indices.size == 0:
            raise UserError("the meta set came out empty (GMM found no clean component); "
                            "use --meta-set lowest-loss:N")

    def meta_batch(self, gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.meta_spec.kind == "clean":
            ds, pool = self.data.clean_meta, np.arange(len(self.data.clean_meta))
        else:
            ds, pool = self.data.train, self.meta_indices
        take = gen.choice(pool, size=min(self.cfg.meta_batch_size, pool.size), replace=False)
        x, y = stack_batch(ds, take)
        return x.to(self.device), y.to(self.device)


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
        if epoch >= cfg.warmup_epochs and self.meta_spec.rebuilt_each_epoch:
            self.rebuild_meta_set(epoch)
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
        weighted, sums, params = self.is_weighted, self.sums, self.params
        x, y, idx = batch
        x, y = x.to(self.device), y.to(self.device)
        batch = self._train_batch(x, y, idx, self.gen, mix=weighted)
        logits = self.model(batch.x)
        terms = self.objective.terms(logits, batch)
        if not torch.isfinite(terms).all():
            raise UserError(f"non-finite training loss at epoch {self.epoch_label()}, iteration {it}: the run "
                            f"diverged; the last checkpoint ({self.out / CHECKPOINT_NAME}) is intact; lower "
                            "--lr/--meta-lr")
        reused = None
        if weighted and self.meta_step_due(it):
            meta_loss, reused = self._meta_step(batch, logits, terms, params, self.buffers, self.gen)
            sums["meta_loss"] += meta_loss
            sums["meta_steps"] += 1
        if weighted:
            with torch.no_grad():
                coeff = self.objective.coefficients(self.weight_fn, terms.detach(), batch)
                w = self.objective.weights(self.weight_fn, terms.detach(), batch)
            loss = (coeff * terms).sum()
            w_first = (w[:, 0] if w.dim() == 2 else w).cpu().numpy()
        else:
            loss = F.cross_entropy(logits, y)
            w_first = np.ones(len(y))
        self.optimizer.zero_grad(set_to_none=True)
        if reused is None:
            loss.backward()
        else:  # the meta step already backpropagated this batch at the net it started from
            for name, p in params.items():
                p.grad = reused[name]
        self.optimizer.step()
        self.updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.updates)
        self.teacher.update(self.model)
        idx_np = idx.numpy()
        self.last_weight[idx_np] = w_first
        self.last_loss[idx_np] = terms[:, 0].detach().cpu().numpy()
        sums["loss"] += float(loss.detach()) * len(y)
        sums["samples"] += len(y)
        sums["steps"] += 1
        return len(y)

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

    def _meta_step(self, batch: TrainBatch, logits: torch.Tensor, terms: torch.Tensor, params: dict,
                   buffers: dict, gen: np.random.Generator) -> tuple[float, dict | None]:
        cfg = self.cfg
        meta_x, meta_y = self.meta_batch(gen)
        step, momentum = self.virtual_step(params)
        reuse = cfg.actual_step == "reuse"
        result = meta_gradient(self.model, self.wnet, params, buffers, batch, meta_x, meta_y, self.objective, step,
                               self.virtual, momentum_buffers=momentum, gates=self.gates, train_out=(logits, terms),
                               keep_graph=not reuse)
        self.apply_meta_result(result)
        return result.meta_loss, (result.train_grads if reuse else None)

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
        sums, weights, losses = self.sums, self.last_weight, self.last_loss
        train = self.data.train
        fam = self.family_of_class.cpu().numpy()[train.targets]
        seen = ~np.isnan(weights)
        row: dict[str, Any] = {
            "train_loss": sums["loss"] / max(sums["samples"], 1), "seconds": round(seconds, 3),
            "lr": self.optimizer.param_groups[0]["lr"], "meta_steps": sums["meta_steps"],
            "meta_loss": sums["meta_loss"] / sums["meta_steps"] if sums["meta_steps"] else None,
        }
        for k, name in enumerate(family_names(self.cfg.families)):
            mask = seen & (fam == k)
            row[f"weight_{name}"] = float(weights[mask].mean()) if mask.any() else None
        if train.clean_targets is not None and epoch >= self.cfg.warmup_epochs:
            auc = clean_noisy_auc(weights[seen], (train.targets == train.clean_targets)[seen])
            row["clean_noisy_auc"] = None if math.isnan(auc) else auc
        self.last_losses = losses[seen & np.isfinite(losses)]
        self.saved_loss_range = None
        return row

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
        losses = self.last_losses
        q = np.quantile(losses, [0.0, 0.01, 0.5, 0.99, 1.0]) if losses.size else np.zeros(5)
        return dict(zip(("min", "p1", "p50", "p99", "max"), (round(float(v), 6) for v in q)))

    # -- the run and the export ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        return self.engine.run()

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        if not any(row.get("meta_steps") for row in rows):
            warnings.warn(f"the exported net never had a meta step (--warmup-epochs {self.cfg.warmup_epochs} >= "
                          f"--epochs {self.cfg.epochs}): its weights are its random initialisation", stacklevel=2)
        net = self.export()
        return {"out": str(self.out), "final": rows[-1] if rows else {}, "centers": net.centers,
                "loss_range": net.loss_range}

    def export(self) -> CMWNet:
        cfg = self.cfg
        provenance = {
            "source": cfg.src, "bias": str(resolve_source(cfg.src, cfg.noise, cfg.imbalance)[1]) or "none",
            "method": cfg.method, "backbone": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
            "meta_set": cfg.meta_set, "meta_grad": cfg.meta_grad, "toolkit_version": __version__,
            "source_labels_digest": self.data.train.labels_digest(),
        }
        net = self.wnet.cpu().with_scales(self.centers.tolist(), self.loss_range())
        net.provenance = provenance
        net.save_pretrained(self.out)
        plot_curves(net, self.out / "curves.png", title=f"{cfg.method} on {cfg.src}")
        self.wnet.to(self.device)
        return net

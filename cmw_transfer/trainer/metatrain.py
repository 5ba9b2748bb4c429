"""The meta-train stage: learn the weighting net on a biased source and write it as an artifact.

Per iteration: one training forward (shared), a meta step every ``meta_interval`` iterations after the CE
warm-up (:func:`cmw_transfer.trainer.metastep.meta_gradient`), then the real step on the weighted loss with the
updated net. Every epoch: metrics line, checkpoint (atomic), and for lowest-loss/GMM meta sets a rebuilt meta set.
All randomness of an epoch is derived from ``(seed, epoch)``, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

from cmw_transfer import __version__
from cmw_transfer.artifact.curves import family_names, plot_curves
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import fit_families
from cmw_transfer.atomic import write_json
from cmw_transfer.bias.apply import apply_bias
from cmw_transfer.dataset import LabeledDataset, create_dataset, resolve_source, split_per_class
from cmw_transfer.errors import UserError
from cmw_transfer.metrics import MetricsLog, clean_noisy_auc, evaluate
from cmw_transfer.metrics.log import METRICS_NAME
from cmw_transfer.models import create_model
from cmw_transfer.trainer.checkpoint import CHECKPOINT_NAME, config_fingerprint, load_checkpoint, save_checkpoint
from cmw_transfer.trainer.common import create_optimizer_and_scheduler, derive_seed, make_loader, resolve_device
from cmw_transfer.trainer.metasets import (
    MetaSetSpec,
    check_class_sizes,
    gmm_clean_indices,
    lowest_loss_indices,
    parse_meta_set,
    per_sample_losses,
)
from cmw_transfer.trainer.metastep import (
    FamusGates,
    VirtualStep,
    meta_gradient,
    parse_meta_grad,
    virtual_names,
    virtual_step_from_optimizer,
)
from cmw_transfer.trainer.objectives import TrainBatch, create_objective
from cmw_transfer.trainer.soft_labels import PseudoLabelBank, make_teacher, mix_inputs, sample_mixup, teacher_probs

METHODS = ("cmwnet", "mwnet", "cmwnet-sl")
# reuse: the real step uses the gradient the virtual step already computed (weights of the net before its update):
#        one backward fewer and the training graph is freed before the meta pass (peak memory ~ one step).
# updated: the paper's order, the real step re-weights with the just-updated net (keeps the graph alive).
ACTUAL_STEPS = ("reuse", "updated")


@dataclass
class MetaTrainConfig:
    src: str = "digits-pmd"
    out: str = "runs/metatrain"
    data_dir: str | None = None
    noise: str | None = None
    imbalance: float | None = None
    method: str = "cmwnet"
    families: int = 3
    model: str = "small_cnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    meta_interval: int = 1
    meta_batch_size: int = 100
    meta_set: str = "clean:10"
    meta_grad: str = "exact"
    normalization: str = "batch"
    mirror_optimizer: bool = False
    actual_step: str = "reuse"
    warmup_epochs: int = 5
    hidden_size: int = 100
    ema_decay: float = 0.99
    mixup_alpha: float = 0.0
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    famus_active: int = 4

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.meta_interval < 1:
            raise UserError(f"--meta-interval must be >= 1 (a meta step every k iterations), got {self.meta_interval}")
        for name in ("epochs", "batch_size", "meta_batch_size", "families", "hidden_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.lr <= 0 or self.meta_lr <= 0:
            raise UserError("--lr and --meta-lr must be > 0")
        try:
            parse_meta_grad(self.meta_grad)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        parse_meta_set(self.meta_set)
        if self.actual_step not in ACTUAL_STEPS:
            raise UserError(f"--actual-step must be one of {', '.join(ACTUAL_STEPS)}, got '{self.actual_step}'")
        if self.method == "mwnet":
            self.families = 1


# Paper recipes (reference-implementations.md §1.2) and the embedded demo; used for options left unset.
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10-pmd": dict(method="cmwnet-sl", model="cifar_resnet32", epochs=120, batch_size=128, lr=0.1,
                        momentum=0.9, weight_decay=1e-3, sched="cosine", meta_lr=1e-3, meta_weight_decay=1e-4,
                        meta_interval=10, meta_batch_size=100, meta_set="lowest-loss:10", warmup_epochs=45,
                        ema_decay=0.999, mixup_alpha=4.0, normalization="batch"),
    "digits-pmd": dict(method="cmwnet", model="small_cnn", epochs=30, batch_size=64, lr=0.05, meta_lr=1e-3,
                       meta_interval=1, meta_batch_size=100, meta_set="clean:10", warmup_epochs=5),
}


def recipe_for(src: str) -> dict[str, Any]:
    return dict(RECIPES.get(src, {}))


# -- data -----------------------------------------------------------------------------------------------------------
@dataclass
class SourceData:
    train: LabeledDataset
    test: LabeledDataset | None
    clean_meta: LabeledDataset | None


def load_source(cfg: MetaTrainConfig, spec: MetaSetSpec) -> SourceData:
    base, bias = resolve_source(cfg.src, cfg.noise, cfg.imbalance)
    clean = create_dataset(base, cfg.data_dir, "train")
    clean_meta = None
    if spec.kind == "clean":
        check_class_sizes(clean.class_counts(), spec.per_class, "clean")
        clean, clean_meta = split_per_class(clean, spec.per_class, seed=cfg.seed)
    train = clean if bias.is_empty else apply_bias(clean, bias, seed=cfg.seed)
    if spec.kind == "lowest-loss":
        check_class_sizes(train.class_counts(), spec.per_class, "lowest-loss")
    try:
        test = create_dataset(base, cfg.data_dir, "test")
    except UserError:
        test = None
    return SourceData(train, test, clean_meta)


def stack_batch(ds: LabeledDataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[int(i)] for i in indices]
    return torch.stack([it[0] for it in items]), torch.as_tensor([it[1] for it in items], dtype=torch.long)


# -- the stage ------------------------------------------------------------------------------------------------------
class MetaTrainer:
    def __init__(self, cfg: MetaTrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        cfg.validate()
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.meta_spec = parse_meta_set(cfg.meta_set)
        torch.manual_seed(cfg.seed)
        self.data = load_source(cfg, self.meta_spec)
        train = self.data.train
        self.num_classes = train.num_classes
        self.class_counts = train.class_counts()
        centers, families = fit_families(self.class_counts, cfg.families)
        self.centers = centers
        self.family_of_class = torch.as_tensor(families, dtype=torch.long, device=self.device)
        in_chans = train[0][0].shape[0]
        self.model = create_model(cfg.model, self.num_classes, in_chans).to(self.device)
        self.wnet = CMWNet(hidden_size=cfg.hidden_size, num_heads=cfg.families).to(self.device)
        self.objective = create_objective(cfg.method, cfg.normalization)
        self.loader = make_loader(train, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                                  distributed=False)
        self.eval_train_loader = make_loader(train, 512, train=False, workers=cfg.workers, seed=cfg.seed,
                                             distributed=False)
        self.test_loader = None if self.data.test is None else make_loader(
            self.data.test, 512, train=False, workers=cfg.workers, seed=cfg.seed, distributed=False)
        self.optimizer, self.scheduler = create_optimizer_and_scheduler(
            self.model, opt="sgd", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            sched=cfg.sched, epochs=cfg.epochs, steps_per_epoch=len(self.loader))
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
        self.fingerprint = config_fingerprint(asdict(cfg), ignore=("epochs", "device", "workers", "out"))
        self.start_epoch = 0
        self.updates = 0
        self.last_losses = np.zeros(0)  # per-sample losses of the last epoch: the artifact's loss range
        if resume:
            self._restore(load_checkpoint(self.out / CHECKPOINT_NAME, self.fingerprint))
        self.log = MetricsLog(self.out / METRICS_NAME, resume_from_epoch=self.start_epoch if resume else None)

    def _classifier_prefix(self) -> str:
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        for name, module in self.model.named_modules():
            if module is head:
                return name
        return list(dict(self.model.named_parameters()))[-1].rsplit(".", 1)[0]

    # -- state ----------------------------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        state = {
            "fingerprint": self.fingerprint, "epoch": epoch, "updates": self.updates,
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

    def _restore(self, state: dict[str, Any]) -> None:
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
        self.start_epoch, self.updates = int(state["epoch"]) + 1, int(state["updates"])

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

    # -- one epoch ---------------------------------------------------------------------------------------------------
    def weight_fn(self, loss: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        return self.wnet(loss, family)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        gen = np.random.default_rng(derive_seed(cfg.seed, epoch, 1))
        torch.manual_seed(derive_seed(cfg.seed, epoch, 2))
        self.loader.set_epoch(epoch)
        self.model.train()
        weighted = epoch >= cfg.warmup_epochs
        n = len(self.data.train)
        last_weight, last_loss = np.full(n, np.nan), np.full(n, np.nan)
        sums = {"loss": 0.0, "meta_loss": 0.0, "steps": 0, "meta_steps": 0, "samples": 0}
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
        start = time.perf_counter()
        for it, (x, y, idx) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            batch = self._train_batch(x, y, idx, gen, mix=weighted)
            logits = self.model(batch.x)
            terms = self.objective.terms(logits, batch)
            if not torch.isfinite(terms).all():
                raise UserError(f"non-finite training loss at epoch {epoch + 1}, iteration {it}: the run diverged; "
                                f"the last checkpoint ({self.out / CHECKPOINT_NAME}) is intact; lower --lr/--meta-lr")
            reused = None
            if weighted and it % cfg.meta_interval == 0:
                meta_loss, reused = self._meta_step(batch, logits, terms, params, buffers, gen)
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
            last_weight[idx_np] = w_first
            last_loss[idx_np] = terms[:, 0].detach().cpu().numpy()
            sums["loss"] += float(loss.detach()) * len(y)
            sums["samples"] += len(y)
            sums["steps"] += 1
            rate = sums["samples"] / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", img_s=f"{rate:.0f}")
        return self._epoch_row(epoch, sums, last_weight, last_loss, time.perf_counter() - start)

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
        if cfg.mirror_optimizer:  # the real optimizer's param groups, Nesterov, per-group weight decay, buffers
            step, momentum = virtual_step_from_optimizer(self.optimizer, params)
        else:
            step, momentum = VirtualStep(self.optimizer.param_groups[0]["lr"]), None
        reuse = cfg.actual_step == "reuse"
        result = meta_gradient(self.model, self.wnet, params, buffers, batch, meta_x, meta_y, self.objective, step,
                               self.virtual, momentum_buffers=momentum, gates=self.gates, train_out=(logits, terms),
                               keep_graph=not reuse)
        self.wnet_optimizer.zero_grad(set_to_none=True)
        for name, p in self.wnet.named_parameters():
            p.grad = result.wnet_grads[name]
        self.wnet_optimizer.step()
        if self.gates is not None and result.gate_grads:
            self.gate_optimizer.zero_grad(set_to_none=True)
            for name, p in self.gates.named_parameters():
                p.grad = result.gate_grads.get(name)
            self.gate_optimizer.step()
        return result.meta_loss, (result.train_grads if reuse else None)

    def _epoch_row(self, epoch: int, sums: dict, weights: np.ndarray, losses: np.ndarray, seconds: float
                   ) -> dict[str, Any]:
        train = self.data.train
        fam = self.family_of_class.cpu().numpy()[train.targets]
        seen = ~np.isnan(weights)
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": sums["loss"] / max(sums["samples"], 1), "seconds": round(seconds, 3),
            "lr": self.optimizer.param_groups[0]["lr"], "meta_steps": sums["meta_steps"],
            "meta_loss": sums["meta_loss"] / sums["meta_steps"] if sums["meta_steps"] else None,
        }
        for k, name in enumerate(family_names(self.cfg.families)):
            mask = seen & (fam == k)
            row[f"weight_{name}"] = float(weights[mask].mean()) if mask.any() else None
        if train.clean_targets is not None and epoch >= self.cfg.warmup_epochs:
            auc = clean_noisy_auc(weights[seen], (train.targets == train.clean_targets)[seen])
            row["clean_noisy_auc"] = None if math.isnan(auc) else auc
        if self.test_loader is not None:
            row.update({f"test_{k}": v for k, v in evaluate(self.model, self.test_loader, self.device).items()
                        if k in ("top1", "top5")})
        self.last_losses = losses[seen & np.isfinite(losses)]
        return row

    def loss_range(self) -> dict[str, float]:
        losses = self.last_losses
        q = np.quantile(losses, [0.0, 0.01, 0.5, 0.99, 1.0]) if losses.size else np.zeros(5)
        return dict(zip(("min", "p1", "p50", "p99", "max"), (round(float(v), 6) for v in q)))

    # -- the run -----------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "run.json", {**asdict(cfg), "fingerprint": self.fingerprint,
                                           "class_counts": self.class_counts.tolist(),
                                           "centers": self.centers.tolist(),
                                           "family_of_class": self.family_of_class.tolist()})
        row: dict[str, Any] = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            if epoch >= cfg.warmup_epochs and self.meta_spec.rebuilt_each_epoch:
                self.rebuild_meta_set(epoch)
            row = self.train_epoch(epoch)
            self.log.append(row)
            save_checkpoint(self.out / CHECKPOINT_NAME, self._state(epoch))
            if self.progress:
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                tqdm.write(" ".join(f"{k}={v}" for k, v in shown.items()))
        net = self.export()
        return {"out": str(self.out), "final": row, "centers": net.centers, "loss_range": net.loss_range}

    def export(self) -> CMWNet:
        cfg = self.cfg
        provenance = {
            "source": cfg.src, "bias": str(resolve_source(cfg.src, cfg.noise, cfg.imbalance)[1]) or "none",
            "method": cfg.method, "backbone": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
            "meta_set": cfg.meta_set, "meta_grad": cfg.meta_grad, "toolkit_version": __version__,
        }
        net = self.wnet.cpu().with_scales(self.centers.tolist(), self.loss_range())
        net.provenance = provenance
        net.save_pretrained(self.out)
        plot_curves(net, self.out / "curves.png", title=f"{cfg.method} on {cfg.src}")
        self.wnet.to(self.device)
        return net

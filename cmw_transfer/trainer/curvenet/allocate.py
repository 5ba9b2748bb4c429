"""CurveNet's allocate stage (``metatrain --method curvenet --curves DIR``), and its frozen use in ``apply``.

A fresh classifier is trained with the meta-train stage's bi-level loop (:class:`MetaTrainer`: the same
``meta_gradient``, exact / skip:N / famus); only the weighting net and its input change. The net is a
:class:`~cmw_transfer.artifact.curvenet.CurveNet` reading each sample's class-normalised probe curve (a fixed
attribute: :class:`~cmw_transfer.weighting.curves.CurveFeatures`) plus a class term, carried into the objective
as ``TrainBatch.features``. As in the paper, meta updates stop at the first lr decay (``meta_stop_epoch``) and
each sample's last weight is reused from then on (a per-sample weight bank, checkpointed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmw_transfer.artifact.curvenet import CurveNet
from cmw_transfer.atomic import atomic_path
from cmw_transfer.trainer.config import CurveNetConfig
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler
from cmw_transfer.trainer.engine.registry import register_trainer
from cmw_transfer.trainer.meta.objectives import TrainBatch
from cmw_transfer.trainer.metatrain.stage import MetaTrainer
from cmw_transfer.weighting.curves import CurveFeatures, check_labels, load_curves

WEIGHTS_BANK_NAME = "weights.npy"  # every training sample's final weight, by sample id


@register_trainer("curvenet")
class CurveNetTrainer(MetaTrainer):
    """The allocate stage: :class:`MetaTrainer` with a CurveNet on the probe's curves, meta updates until the stop."""

    state_keys = (*MetaTrainer.state_keys, "weight_bank")

    cfg: CurveNetConfig

    def build_weighting_net(self) -> torch.nn.Module:
        cfg, train = self.cfg, self.data.train
        curves = load_curves(cfg.curves, hint=self.probe_hint())
        check_labels(curves, train.targets, self.probe_hint())
        transferable = cfg.curvenet_mode == "transferable"
        self.features = CurveFeatures(curves, train.num_classes, skip=cfg.curve_skip,
                                      length=cfg.curve_length if transferable else None)
        self.curves = curves
        # the class term: the observed label (faithful) or its class-size family (transferable)
        self.key_of_class = (self.family_of_class if transferable
                             else torch.arange(train.num_classes, device=self.device))
        self.bank = np.full(len(train), np.nan, dtype=np.float32)
        self.stop = cfg.stop_epoch()
        self.frozen = False
        self._idx = np.zeros(0, dtype=np.int64)
        probe = {**curves.schedule, **{k: curves.record.get("config", {}).get(k) for k in ("model", "lr",
                                                                                          "batch_size")}}
        return CurveNet(self.features.dim, len(self.centers) if transferable else train.num_classes,
                        cfg.curvenet_mode, cfg.embed_dim, factor=cfg.curvenet_factor, bias=cfg.curvenet_bias,
                        curve_skip=cfg.curve_skip, probe=probe,
                        centers=self.centers.tolist() if transferable else None)

    def probe_hint(self) -> str:
        cfg = self.cfg
        parts = [f"cmw-transfer probe --dataset {cfg.src}", f"--meta-set {cfg.meta_set}" if
                 cfg.meta_set.startswith("clean:") else "", f"--noise {cfg.noise}" if cfg.noise else "",
                 f"--imbalance {cfg.imbalance:g}" if cfg.imbalance else "", f"--seed {cfg.seed} --out DIR"]
        return " ".join(p for p in parts if p)

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        return create_optimizer_and_scheduler(
            self.model, opt="sgd", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            sched=cfg.sched, epochs=cfg.epochs, steps_per_epoch=len(self.loader),
            decay_milestones=cfg.decay_milestones())

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "curves": self.curves.record.get("fingerprint")}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "weight_bank": torch.as_tensor(self.bank)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        bank = state["weight_bank"].numpy()
        if bank.shape != self.bank.shape:
            raise ValueError(f"weight bank of {bank.shape[0]} samples, the training set has {self.bank.shape[0]}")
        self.bank = bank.astype(np.float32).copy()

    # -- the stop of meta-learning, the weights reused ----------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> str:
        note = super().begin_epoch(epoch)
        self.frozen = epoch >= self.stop
        return note + (" (CurveNet frozen)" if self.frozen and self.is_weighted else "")

    def meta_step_due(self, it: int) -> bool:
        return not self.frozen and super().meta_step_due(it)

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: np.random.Generator,
                     mix: bool) -> TrainBatch:
        self._idx = idx.numpy()
        feats = torch.as_tensor(self.features(self._idx), device=self.device)
        return TrainBatch(x, y, self.key_of_class, features=feats)

    def weight_fn(self, curve: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The actual step's weights: the net's before the stop (and banked), each sample's last weight after."""
        if self.frozen:
            banked = torch.as_tensor(self.bank[self._idx], device=self.device)
            missing = torch.isnan(banked)
            if missing.any():  # never seen before the stop (a batch dropped every epoch): the frozen net's weight
                banked = torch.where(missing, self.wnet(curve, key).to(banked.dtype), banked)
            return banked.to(curve.dtype)
        w = self.wnet(curve, key)
        self.bank[self._idx] = w.detach().float().cpu().numpy()
        return w

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        row = super().end_epoch(epoch, seconds)
        row["curvenet_frozen"] = bool(self.frozen)
        return row

    # -- the artifact -------------------------------------------------------------------------------------------------
    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        net = self.export()
        return {"out": str(self.out), "final": rows[-1] if rows else {}, "mode": net.mode,
                "curve_length": net.curve_length, "meta_stop_epoch": self.stop}

    def export(self) -> CurveNet:
        cfg = self.cfg
        net = self.wnet.cpu()
        net.provenance = self.provenance(mode=cfg.curvenet_mode, meta_stop_epoch=self.stop)
        net.save_pretrained(self.out)
        missing = np.flatnonzero(np.isnan(self.bank))  # never in a batch before the stop: the frozen net's weight
        if missing.size:
            keys = self.key_of_class.cpu()[torch.as_tensor(self.data.train.targets[missing])]
            with torch.no_grad():
                self.bank[missing] = net(torch.as_tensor(self.features(missing)), keys).numpy()
        with atomic_path(self.out / WEIGHTS_BANK_NAME) as tmp, open(tmp, "wb") as fh:
            np.save(fh, self.bank)
        self.wnet.to(self.device)
        return net

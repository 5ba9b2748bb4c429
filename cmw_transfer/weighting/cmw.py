"""Weighting per-sample losses with a CMW-Net on a given dataset: the plug-in API.

``CMWLoss`` is the three-line integration for users who keep their own training loop, a drop-in for timm's
``CrossEntropyLoss`` / ``LabelSmoothingCrossEntropy`` / ``SoftTargetCrossEntropy``::

    criterion = CMWLoss.from_spec("pretrained:cmwnet-digits-pmd", class_counts=train_set.class_counts())
    loss = criterion(model(x), y)       # weighted cross-entropy, the net frozen
    loss.backward()

The families are re-fitted on *this* dataset's class counts (meta-test re-clustering) and each class uses the
head of the same size rank. The net receives the detached loss, so no gradient flows into it.

Targets may be class indices ``[B]`` (``ignore_index`` honoured, ``label_smoothing`` as in
``torch.nn.functional.cross_entropy``) or a target distribution ``[B, C]`` (timm ``Mixup`` / CutMix output). For a
distribution ``q`` the loss is the cross-entropy against ``q`` and the weight is the expectation of the net over
the classes of ``q``: ``w = sum_c q_c * V(loss, family(c))``. It is linear in ``q``, so a one-hot ``q`` gives the
hard-label weight exactly, and a mixup of two labels blends their two heads.

Outside a torch loop, :func:`sample_weights` maps numpy losses and labels to weights (cleanlab style).

Safe transfer (:mod:`cmw_transfer.weighting.guards`, the same pieces the CLI trainers use): ``warmup="auto"`` (with
``epochs``) keeps plain CE until the net trusts the target's samples, ``min_class_weight`` keeps every class's
mean weight in a batch at least that fraction of the batch mean, and :meth:`CMWLoss.end_epoch` (call it once per
epoch) closes the epoch: it advances the warm-up and returns the epoch's per-class mean weights, the classes left
far below the others and the loss-range check.

Distributed training: every rank must build the criterion from the *same* ``class_counts`` (the global counts),
or the ranks weight with different families; ``check_same_across_ranks`` (or ``from_spec(...,
process_group=...)``) verifies it. With ``normalization="sum"`` the denominator ``sum(w)`` is per rank (each
rank normalises its own batch; DDP then averages the gradients), as ``"batch"`` divides by the per-rank batch.
``"sum"`` is the default, as in ``apply``: with ``"batch"`` (the meta-training form) a frozen net whose mean weight
on the target is 0.2-0.45 shrinks the effective learning rate by as much (README, "Transfer across datasets").
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from cmw_transfer.weighting.base import NORMALIZATIONS, WeightedLoss, loss_coefficients
from cmw_transfer.weighting.families import refit
from cmw_transfer.weighting.guards import (
    ClassWeightMonitor,
    LossRangeMonitor,
    WarmupGate,
    lift_class_floor,
    reference_weight,
    trust_verdict,
)


def check_same_across_ranks(class_counts: Sequence[float] | np.ndarray | torch.Tensor,
                            process_group: Any = None) -> None:
    """Raise ``UserError`` on every rank unless all ranks of ``process_group`` hold identical ``class_counts``.

    A no-op without an initialised ``torch.distributed`` process group. Collective: call it on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cpu")
    if dist.get_backend(process_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64).reshape(-1), device=device)
    size = torch.tensor([counts.numel(), -counts.numel()], dtype=torch.float64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=process_group)
    if size[0] != -size[1]:
        raise UserError(f"class_counts differ across ranks: between {int(-size[1])} and {int(size[0])} classes; "
                        "pass the global training-set counts on every rank")
    low, high = counts.clone(), counts.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=process_group)
    differ = torch.nonzero(low != high).reshape(-1)
    if differ.numel():
        raise UserError(f"class_counts differ across ranks for {differ.numel()} class(es) (first: class "
                        f"{int(differ[0])}); pass the global training-set counts on every rank, not a shard's")


class CMWLoss(WeightedLoss):
    """Frozen-net weighted cross-entropy; holds the class -> family map of the target dataset."""

    def __init__(self, net: CMWNet, family_of_class: Sequence[int] | np.ndarray | torch.Tensor,
                 normalization: str = "sum", *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 min_class_weight: float = 0.0, warmup: str | int | None = None, epochs: int | None = None) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown weight normalisation '{normalization}', expected one of {NORMALIZATIONS}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if not 0.0 <= min_class_weight <= 1.0:
            raise ValueError(f"min_class_weight must be in [0, 1], got {min_class_weight}")
        self.net = net.eval().requires_grad_(False)
        self.normalization = normalization
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.min_class_weight = float(min_class_weight)
        self.register_buffer("family_of_class", torch.as_tensor(np.asarray(family_of_class), dtype=torch.long))
        self.num_classes = int(self.family_of_class.numel())
        self.gate = None
        if warmup is not None:
            if warmup == "auto" and not epochs:
                raise ValueError("warmup='auto' needs the run's number of epochs (epochs=...)")
            self.gate = WarmupGate(warmup, int(epochs or 0), self.reference_weight())
        self.epoch = 1
        self.class_monitor = ClassWeightMonitor(self.num_classes)
        self.range_monitor = LossRangeMonitor(net.loss_range)
        self.trust_monitor = ClassWeightMonitor(self.num_classes)  # raw weights, before the floor: the trust check

    @classmethod
    def from_net(cls, net: CMWNet, class_counts: Sequence[int] | np.ndarray, normalization: str = "sum", *,
                 process_group: Any = None, **kwargs: Any) -> CMWLoss:
        """Families re-fitted on ``class_counts``; under torch.distributed, first checks that every rank of
        ``process_group`` (default: the world) passed the same counts (a collective: build it on every rank)."""
        return cls._for_counts(net, class_counts, normalization, process_group, kwargs)

    @classmethod
    def from_spec(cls, spec: str, class_counts: Sequence[int] | np.ndarray, normalization: str = "sum", *,
                  process_group: Any = None, **kwargs: Any) -> CMWLoss:
        """``from_net`` on ``CMWNet.from_pretrained(spec)``; keywords: ``ignore_index``, ``label_smoothing``."""
        return cls._for_counts(CMWNet.from_pretrained(spec), class_counts, normalization, process_group, kwargs)

    @classmethod
    def _for_counts(cls, net: CMWNet, class_counts: Sequence[int] | np.ndarray, normalization: str,
                    process_group: Any, kwargs: dict[str, Any]) -> CMWLoss:
        """What ``from_net`` and ``from_spec`` share; called directly by both, so a warning's ``stacklevel`` of
        3 is the user's line."""
        check_same_across_ranks(class_counts, process_group)
        _, family, advice = refit(net, class_counts)
        if advice is not None:
            warnings.warn(advice, stacklevel=3)
        return cls(net, family, normalization, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> CMWLoss:
        """``.to(device)`` and the like also move the monitors (their sums are reduced over DDP ranks there)."""
        super()._apply(fn, recurse)
        self.class_monitor.to(self.family_of_class.device)
        self.range_monitor.to(self.family_of_class.device)
        self.trust_monitor.to(self.family_of_class.device)
        return self

    def reference_weight(self) -> float | None:
        """The net's mean weight over the heads this target uses at the source's median loss (the warm-up's
        yardstick; None without a recorded loss range)."""
        return reference_weight(self.net, self.net.loss_range, self.family_of_class)

    @torch.no_grad()
    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Raw per-sample weights in [0, 1] for per-sample losses under (observed) targets: class indices, or a
        target distribution ``[B, C]`` (expected weight over its classes, see the module docstring)."""
        losses = losses.detach()
        if targets.is_floating_point():
            per_head = torch.stack([self.net(losses, torch.full_like(losses, k, dtype=torch.long))
                                    for k in range(self.net.num_heads)], dim=1)  # [B, K]
            per_class = per_head[:, self.family_of_class]  # [B, C]
            return (targets.to(per_class.dtype) * per_class).sum(dim=1)
        return self.net(losses, self.family_of_class[targets])

    def applied_weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """The weights with the class floor (``min_class_weight``) lifted: what the loss multiplies."""
        return self._lift(self.weights(losses, targets), targets)

    def _lift(self, weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.min_class_weight > 0:
            return lift_class_floor(weights, targets, self.num_classes, self.min_class_weight)
        return weights

    def observe(self, losses: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> None:
        """The guards' statistics of a step: losses against the recorded range, per-class weights and losses."""
        self.range_monitor.observe(losses)
        self.class_monitor.observe(weights, targets, losses)

    def observe_raw(self, losses: torch.Tensor, targets: torch.Tensor) -> None:
        """The net's raw weights (no class floor) per class, for :meth:`trust` (class-index targets only)."""
        self.trust_monitor.observe(self.weights(losses, targets), targets)

    def trust(self, class_counts: Sequence[float]) -> dict[str, Any]:
        """:func:`~cmw_transfer.weighting.guards.trust_verdict` on what :meth:`observe_raw` saw since the last
        call (reduced over DDP ranks): is the frozen net fit for this target?"""
        self.trust_monitor.reduce()
        verdict = trust_verdict(self.trust_monitor.class_means(), list(class_counts))
        self.trust_monitor.reset()
        return verdict

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            if targets.shape != logits.shape:
                raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got "
                                 f"{tuple(targets.shape)}")
        else:
            keep = targets != self.ignore_index
            if not bool(keep.all()):
                logits, targets = logits[keep], targets[keep]
        if logits.shape[0] == 0:  # every sample ignored: a zero that still has a graph
            return logits.sum() * 0.0
        losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
        weights = self.weights(losses, targets)
        if self.gate is not None and not self.gate.applies(self.epoch):  # warm-up: plain CE, watch the net
            if self.training:
                self.gate.observe(weights)
            return losses.mean()
        if targets.is_floating_point():  # no class floor, no per-class statistics for a distribution
            if self.training:
                self.range_monitor.observe(losses)
        else:
            weights = self._lift(weights, targets)
            if self.training:
                self.observe(losses, weights, targets)
        return (loss_coefficients(weights, self.normalization) * losses).sum()

    def end_epoch(self) -> dict[str, Any]:
        """Close the current epoch (warm-up decision, monitors reduced over DDP ranks); returns what it saw.

        ``weighting`` (was the net applied), ``warmup_start_epoch`` (first weighted epoch, once known),
        ``class_mean_weight`` (per class, None where no sample was seen), ``starved_classes``,
        ``weight_loss_cov`` (the pooled within-class covariance of weight and loss: positive when the net favours
        the higher losses of a class) and the loss-range fields of
        :class:`~cmw_transfer.weighting.guards.LossRangeMonitor`.
        """
        applied = self.gate is None or self.gate.applies(self.epoch)
        report: dict[str, Any] = {"epoch": self.epoch, "weighting": applied}
        if self.gate is not None:
            report["would_be_mean_weight"] = self.gate.end_epoch(self.epoch)
            report["warmup_start_epoch"] = self.gate.start_epoch
        if applied:
            self.class_monitor.reduce()
            report["class_mean_weight"] = self.class_monitor.class_means()
            report["starved_classes"] = self.class_monitor.starved()
            report["weight_loss_cov"] = self.class_monitor.within_class_cov()
            report.update(self.range_monitor.report())
        self.class_monitor.reset()
        self.epoch += 1
        return report


def sample_weights(losses: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                   class_counts: Sequence[float] | np.ndarray, net: CMWNet | str) -> np.ndarray:
    """Per-sample weights in [0, 1] as a numpy array, for users outside a torch training loop.

    ``losses``: per-sample training losses ``[N]``; ``labels``: observed class indices ``[N]`` or target
    distributions ``[N, C]``; ``class_counts``: samples per class of the training set (families are fitted on
    it); ``net``: a ``CMWNet`` or a weights spec (``pretrained:NAME``, ``hub:org/name``, a directory).
    """
    model = CMWNet.from_pretrained(net) if isinstance(net, str) else net
    losses_arr = np.asarray(losses, dtype=np.float32).reshape(-1)
    labels_arr = np.asarray(labels)
    if labels_arr.shape[0] != losses_arr.shape[0]:
        raise ValueError(f"{losses_arr.shape[0]} losses but {labels_arr.shape[0]} labels")
    if not np.all(np.isfinite(losses_arr)):
        raise ValueError("losses must be finite")
    counts = np.asarray(class_counts)
    if labels_arr.ndim == 1 and labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() >= counts.size):
        raise ValueError(f"labels must lie in [0, {counts.size}) (one count per class), got "
                         f"{labels_arr.min()}..{labels_arr.max()}")
    _, family, advice = refit(model, counts)
    if advice is not None:
        warnings.warn(advice, stacklevel=2)
    criterion = CMWLoss(model, family)
    device = next(model.parameters()).device
    targets = torch.as_tensor(labels_arr if labels_arr.ndim == 2 else labels_arr.astype(np.int64), device=device)
    return criterion.weights(torch.as_tensor(losses_arr, device=device), targets).cpu().numpy()

"""Weighting per-sample losses with a CMW-Net on a given dataset: the plug-in API.

``CMWLoss`` is the three-line integration for users who keep their own training loop::

    criterion = CMWLoss.from_spec("pretrained:cmwnet-digits-pmd", class_counts=train_set.class_counts())
    loss = criterion(model(x), y)       # weighted cross-entropy, the net frozen
    loss.backward()

The families are re-fitted on *this* dataset's class counts (meta-test re-clustering) and each class uses the
head of the same size rank. The net receives the detached loss, so no gradient flows into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import fit_families

NORMALIZATIONS = ("batch", "sum", "none")


def loss_coefficients(weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample coefficients c with ``loss = sum(c * per_sample_loss)``.

    ``batch`` (default): w / B, the MW-Net / CMW-Net form. ``sum``: w / sum(w), the class-imbalance form of the
    authors' LT code; the denominator stays in the graph, so a meta-gradient sees the normalisation too.
    ``none``: plain sum of w * loss (scales the step with the batch size; for completeness).
    """
    if mode == "batch":
        return weights / weights.shape[0]
    if mode == "sum":
        return weights / weights.sum().clamp_min(1e-12)
    if mode == "none":
        return weights
    raise ValueError(f"unknown weight normalisation '{mode}', expected one of {NORMALIZATIONS}")


class CMWLoss(nn.Module):
    """Frozen-net weighted cross-entropy; holds the class -> family map of the target dataset."""

    def __init__(self, net: CMWNet, family_of_class: Sequence[int] | np.ndarray | torch.Tensor,
                 normalization: str = "batch") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown weight normalisation '{normalization}', expected one of {NORMALIZATIONS}")
        self.net = net.eval().requires_grad_(False)
        self.normalization = normalization
        self.register_buffer("family_of_class", torch.as_tensor(np.asarray(family_of_class), dtype=torch.long))

    @classmethod
    def from_net(cls, net: CMWNet, class_counts: Sequence[int] | np.ndarray, normalization: str = "batch") -> CMWLoss:
        _, families = fit_families(class_counts, net.num_heads)
        return cls(net, families, normalization)

    @classmethod
    def from_spec(cls, spec: str, class_counts: Sequence[int] | np.ndarray, normalization: str = "batch") -> CMWLoss:
        return cls.from_net(CMWNet.from_pretrained(spec), class_counts, normalization)

    @torch.no_grad()
    def weights(self, losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Raw per-sample weights in [0, 1] for per-sample losses under (observed) integer targets."""
        return self.net(losses.detach(), self.family_of_class[targets])

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(logits, targets, reduction="none")
        return (loss_coefficients(self.weights(losses, targets), self.normalization) * losses).sum()

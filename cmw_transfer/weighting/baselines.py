"""Fixed (not learned) weighting functions: the baselines a learned net has to beat.

They are :class:`~cmw_transfer.weighting.base.WeightedLoss` criteria like :class:`~cmw_transfer.weighting.CMWLoss`,
so the apply stage (``--weighting focal|class-balanced``) and your own loop use them exactly like a frozen CMW-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cmw_transfer.weighting.base import WeightedLoss


class FocalWeighting(WeightedLoss):
    """Focal loss (Lin et al. 2017) as a weighting of cross-entropy: ``w = (1 - p_t)^gamma``, ``p_t = exp(-CE)``.

    The factor is computed on the detached loss, like every weighting here: it is the increasing function of the
    loss that MW-Net's paper contrasts with its learned, noise-robust decreasing one.
    """

    def __init__(self, gamma: float = 2.0, normalization: str = "batch") -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma, self.normalization = float(gamma), normalization

    @torch.no_grad()
    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return (1.0 - torch.exp(-losses.detach())).clamp_min(0.0) ** self.gamma


class ClassBalancedWeighting(WeightedLoss):
    """Class-balanced loss (Cui et al. 2019): ``w_c = (1 - beta) / (1 - beta^n_c)``, rescaled to mean 1 per class.

    A class without samples (never a target) keeps the weight of a one-sample class and is left out of the mean.
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray, beta: float = 0.999,
                 normalization: str = "batch") -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
        raw = np.asarray(class_counts, dtype=np.float64)
        counts = np.maximum(raw, 1.0)
        per_class = (1.0 - beta) / (1.0 - np.power(beta, counts)) if beta > 0 else np.ones_like(counts)
        present = raw > 0 if (raw > 0).any() else np.ones_like(raw, dtype=bool)
        per_class = per_class * present.sum() / per_class[present].sum()  # mean 1 over the classes with samples
        self.normalization = normalization
        self.register_buffer("class_weight", torch.as_tensor(per_class, dtype=torch.float32))

    @torch.no_grad()
    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_weight[targets].to(losses.dtype)

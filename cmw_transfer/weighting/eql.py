"""Equalization loss (EQL, Tan et al. 2020), softmax form: the loss a meta-learned MES generalises.

``p_y = e^{z_y} / sum_k w_k e^{z_k}`` with ``w_k = 1 - beta_k * T_k * (1 - y_k)``: for a sample of class ``y``, the
softmax denominator drops (``w_k = 0``) every *rare* negative class ``k`` (``T_k = 1`` when its training frequency
is below the threshold lambda), so a head sample no longer pushes the tail logits down. ``beta_k ~ Bernoulli(rho)``
keeps a fraction of those discouraging gradients. The advisor's MES replaces the fixed ``T_k`` by a learned
per-sample ``s_k`` in (0, 1) (:mod:`cmw_transfer.trainer.meta.advisor`); both go through
:func:`equalized_cross_entropy`.

beta is drawn per sample *and* per class (one Bernoulli per entry of the ``[B, C]`` matrix), as in the EQL code's
softmax variant; the advisor paper does not say, and the advisor uses the same choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.weighting.base import WeightedLoss

EQL_RHO = 0.9  # P(beta = 1), the advisor paper's rho


def equalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log(e^{z_y} / sum_k (1 - suppress_k (1 - y_k)) e^{z_k})``; ``suppress`` is ``[B, C]`` in [0, 1].

    ``suppress = 0`` is plain softmax cross-entropy; ``suppress_k = 1`` removes class ``k`` from the denominator.
    """
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    log_w = torch.log1p(-suppress.to(logits.dtype) * (1.0 - onehot))  # -inf where a class is removed
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    return torch.logsumexp(logits + log_w, dim=1) - target_logit


def bernoulli_beta(shape: tuple[int, ...], rho: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``beta ~ Bernoulli(rho)`` per entry (per sample and per class), as float."""
    draw = torch.rand(shape, generator=generator)
    return (draw < rho).to(torch.get_default_dtype()).to(device)


def rare_class_mask(class_counts: Sequence[int] | np.ndarray, threshold: float) -> torch.Tensor:
    """``T_k = 1`` for the classes whose training frequency ``n_k / N`` is below ``threshold`` (lambda)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    freq = counts / max(counts.sum(), 1.0)
    return torch.as_tensor(freq < threshold, dtype=torch.float32)


def default_threshold(num_classes: int) -> float:
    """lambda when none is given: half the uniform frequency ``1 / (2C)`` (a class at under half its fair share)."""
    return 0.5 / num_classes


class EQLWeighting(WeightedLoss):
    """``apply --weighting eql``: the fixed EQL loss (no weighting net).

    A :class:`~cmw_transfer.weighting.base.WeightedLoss` like the other fixed baselines: ``per_sample_loss(logits,
    y)`` replaces the per-sample cross-entropy (EQL changes the softmax itself, not the sample weights) and
    ``weights`` is 1. beta is drawn from torch's global generator, which the apply stage seeds per epoch (exact
    resume).
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray, threshold: float | None = None,
                 rho: float = EQL_RHO, normalization: str = "batch") -> None:
        super().__init__()
        counts = np.asarray(class_counts)
        threshold = default_threshold(counts.size) if threshold is None else float(threshold)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"EQL rho must be in [0, 1], got {rho}")
        if threshold < 0:
            raise ValueError(f"EQL threshold must be >= 0, got {threshold}")
        self.threshold, self.rho, self.normalization = threshold, float(rho), normalization
        self.register_buffer("rare", rare_class_mask(counts, threshold))

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        beta = bernoulli_beta(tuple(logits.shape), self.rho, device=logits.device).to(logits.dtype)
        return equalized_cross_entropy(logits, targets, beta * self.rare.to(logits.dtype)[None, :])

    @torch.no_grad()
    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones_like(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_sample_loss(logits, targets).mean()

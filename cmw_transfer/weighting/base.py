"""What every criterion shares: the loss as coefficients times per-sample losses.

``loss = sum_i c_i * l_i`` with ``c = norm(w)``: the weighting decides ``w``, the normalisation ``norm`` (one of
:data:`~cmw_transfer.defaults.NORMALIZATIONS`) how the weights become coefficients.
"""

from __future__ import annotations

import torch

from cmw_transfer.defaults import NORMALIZATIONS

__all__ = ["NORMALIZATIONS", "loss_coefficients"]


def loss_coefficients(weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample coefficients c with ``loss = sum(c * per_sample_loss)``.

    ``batch`` (default): w / B, the MW-Net / CMW-Net form. ``sum``: w / sum(w), the class-imbalance form of the
    authors' LT code; the denominator stays in the graph, so a meta-gradient sees the normalisation too.
    ``none``: plain sum of w * loss (scales the step with the batch size; for completeness).
    """
    if mode == "batch":
        return weights / max(weights.shape[0], 1)
    if mode == "sum":
        return weights / weights.sum().clamp_min(1e-12)
    if mode == "none":
        return weights
    raise ValueError(f"unknown weight normalisation '{mode}', expected one of {NORMALIZATIONS}")

"""What every criterion shares: the loss as coefficients times per-sample losses, and the protocol the apply step
calls.

``loss = sum_i c_i * l_i`` with ``c = norm(w)``: the weighting decides ``w``, the normalisation ``norm`` (one of
:data:`~cmw_transfer.defaults.NORMALIZATIONS`) how the weights become coefficients. Every criterion of this
package is a :class:`WeightedLoss` and so a :class:`Criterion`: the apply stage's step calls
:meth:`~Criterion.weighted_loss` (and :meth:`~Criterion.observe` for the guards of a frozen net) instead of
re-implementing any of them, and a criterion of your own that has these methods runs there too.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cmw_transfer.defaults import NORMALIZATIONS

__all__ = ["NORMALIZATIONS", "Criterion", "WeightedLoss", "loss_coefficients"]


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


@runtime_checkable
class Criterion(Protocol):
    """What the apply step needs of a criterion."""

    normalization: str

    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Raw per-sample weights (detached); ``idx`` are the batch's sample ids (for per-sample attributes)."""
        ...

    def applied_weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """The weights the loss multiplies (the raw ones after any guard, e.g. a class floor)."""
        ...

    def weighted_loss(self, logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, per-sample losses, applied weights)`` of a batch of class-index targets."""
        ...

    def observe(self, losses: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> None:
        """A training step's losses and applied weights, for the criterion's monitors (if it has any)."""
        ...


class WeightedLoss(nn.Module):
    """Base of the criteria: ``sum(norm(w) * l)`` with ``l`` :meth:`per_sample_loss` (cross-entropy) and ``w``
    :meth:`applied_weights`; a subclass defines :meth:`weights` and sets ``normalization``."""

    normalization: str = "batch"

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none")

    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                ) -> torch.Tensor:
        raise NotImplementedError

    def applied_weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                        ) -> torch.Tensor:
        return self.weights(losses, targets, idx)

    def weighted_loss(self, logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        losses = self.per_sample_loss(logits, targets)
        w = self.applied_weights(losses, targets, idx)
        return (loss_coefficients(w, self.normalization) * losses).sum(), losses, w

    def observe(self, losses: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> None:
        """No monitors by default."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.weighted_loss(logits, targets)[0]

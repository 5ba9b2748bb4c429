"""Weighted training objectives as ``J = sum_{i,t} c_{i,t}(theta) * l_{i,t}(w)``.

Splitting an objective into per-sample loss *terms* ``l`` (functions of the classifier) and *coefficients* ``c``
(functions of the weighting net on detached losses) is what lets the meta-step compute the exact meta-gradient
from first-order pieces, and lets the apply stage reuse the very same loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.weighting import loss_coefficients
from cmw_transfer.weighting.soft_labels import soft_label_coefficients, soft_label_terms

# (detached loss [B] or per-sample features [B, D], family / class key [B]) -> weight [B]
WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainBatch:
    """A training batch plus what the objective needs: families of the observed labels, optional SL state."""

    x: torch.Tensor
    y: torch.Tensor
    family_of_class: torch.Tensor
    pseudo: torch.Tensor | None = None  # [B, C] soft pseudo-labels (CMW-Net-SL)
    lam: float = 1.0  # mixup coefficient; x is already mixed with x[perm]
    perm: torch.Tensor | None = None
    # fixed per-sample inputs of the weighting net instead of the loss (CurveNet: the normalised loss curve)
    features: torch.Tensor | None = None

    @property
    def family(self) -> torch.Tensor:
        return self.family_of_class[self.y]


class WeightedCE:
    """MW-Net / CMW-Net: ``sum_i norm(V(l_i))_i * CE_i``."""

    def __init__(self, normalization: str = "batch") -> None:
        self.normalization = normalization

    def terms(self, logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        return F.cross_entropy(logits, batch.y, reduction="none")[:, None]

    def coefficients(self, weight_fn: WeightFn, terms: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        return loss_coefficients(self.weights(weight_fn, terms, batch), self.normalization)[:, None]

    def weights(self, weight_fn: WeightFn, terms: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """The net reads the detached loss, or the batch's per-sample ``features`` when it carries them."""
        inputs = terms[:, 0].detach() if batch.features is None else batch.features
        return weight_fn(inputs, batch.family)


class SoftLabelCE:
    """CMW-Net-SL: the weight mixes the given label with a pseudo-label, ``v*CE(y) + (1-v)*CE(p)``, under mixup.

    With mixup partner ``b = perm``: ``lam*[v_a CE(y_a) + (1-v_a) CE(p_a)] + (1-lam)*[v_b CE(y_b) + (1-v_b) CE(p_b)]``
    averaged over the batch, exactly the authors' inner and actual loss.
    """

    def terms(self, logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        if batch.pseudo is None:
            raise ValueError("SoftLabelCE needs batch.pseudo")
        return soft_label_terms(logits, batch.y, batch.pseudo, self._perm(batch))

    @staticmethod
    def _perm(batch: TrainBatch) -> torch.Tensor:
        return batch.perm if batch.perm is not None else torch.arange(len(batch.y), device=batch.y.device)

    def weights(self, weight_fn: WeightFn, terms: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        fam = batch.family
        partner = fam[self._perm(batch)]
        return torch.stack([weight_fn(terms[:, 0].detach(), fam), weight_fn(terms[:, 2].detach(), partner)], 1)

    def coefficients(self, weight_fn: WeightFn, terms: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        v = self.weights(weight_fn, terms, batch)
        return soft_label_coefficients(v[:, 0], v[:, 1], batch.lam) / terms.shape[0]


def create_objective(method: str, normalization: str = "batch") -> WeightedCE | SoftLabelCE:
    if method in ("cmwnet", "mwnet", "curvenet"):
        return WeightedCE(normalization)
    if method == "cmwnet-sl":
        return SoftLabelCE()
    raise ValueError(f"unknown method '{method}'")

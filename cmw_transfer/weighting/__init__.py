"""Every criterion a user can put in a training loop, and what the apply stage runs them through.

``cmw`` (:class:`CMWLoss`, :func:`sample_weights`: a frozen CMW-Net / MW-Net), ``soft_labels``
(:class:`SoftLabelCMWLoss`: CMW-Net-SL), ``curves`` (:class:`CurveWeighting`: a frozen CurveNet), ``baselines``
(focal, class-balanced), ``eql`` (the equalization loss), ``families`` (meta-test re-clustering), ``guards``
(warm-up gate, class floor, starvation and loss-range monitors), ``base`` (the coefficients every loss shares).
The names below are loaded on first use, so importing one criterion does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "CMWLoss": "cmw", "sample_weights": "cmw", "check_same_across_ranks": "cmw",
    "loss_coefficients": "base", "NORMALIZATIONS": "base",
    "FocalWeighting": "baselines", "ClassBalancedWeighting": "baselines",
    "EQLWeighting": "eql",
    "SoftLabelCMWLoss": "soft_labels",
    "CurveWeighting": "curves",
    "target_families": "families",
}

if TYPE_CHECKING:
    from cmw_transfer.weighting.base import NORMALIZATIONS, loss_coefficients
    from cmw_transfer.weighting.baselines import ClassBalancedWeighting, FocalWeighting
    from cmw_transfer.weighting.cmw import CMWLoss, check_same_across_ranks, sample_weights
    from cmw_transfer.weighting.curves import CurveWeighting
    from cmw_transfer.weighting.eql import EQLWeighting
    from cmw_transfer.weighting.families import target_families
    from cmw_transfer.weighting.soft_labels import SoftLabelCMWLoss

__all__ = [
    "NORMALIZATIONS",
    "CMWLoss",
    "ClassBalancedWeighting",
    "CurveWeighting",
    "EQLWeighting",
    "FocalWeighting",
    "SoftLabelCMWLoss",
    "check_same_across_ranks",
    "loss_coefficients",
    "sample_weights",
    "target_families",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

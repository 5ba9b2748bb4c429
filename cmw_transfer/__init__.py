"""cmw-transfer: meta-train a sample-weighting net once, deploy it anywhere.

The public names below are loaded on first use (module ``__getattr__``), so ``import cmw_transfer`` and
``cmw-transfer --help`` do not import torch, scikit-learn or huggingface_hub.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cmw_transfer.defaults import __version__
from cmw_transfer.errors import UserError

_LAZY = {
    "CMWNet": "cmw_transfer.artifact",
    "DegenerateScalesWarning": "cmw_transfer.artifact.scales",
    "assign_families": "cmw_transfer.artifact.scales",
    "fit_families": "cmw_transfer.artifact.scales",
    "fit_scale_centers": "cmw_transfer.artifact.scales",
    "CMWLoss": "cmw_transfer.weighting",
    "sample_weights": "cmw_transfer.weighting",
    "check_same_across_ranks": "cmw_transfer.weighting",
    "create_model": "cmw_transfer.models",
}

if TYPE_CHECKING:
    from cmw_transfer.artifact import CMWNet
    from cmw_transfer.artifact.scales import DegenerateScalesWarning, assign_families, fit_families, fit_scale_centers
    from cmw_transfer.models import create_model
    from cmw_transfer.weighting import CMWLoss, check_same_across_ranks, sample_weights

__all__ = [
    "CMWLoss",
    "CMWNet",
    "DegenerateScalesWarning",
    "UserError",
    "__version__",
    "assign_families",
    "check_same_across_ranks",
    "create_model",
    "fit_families",
    "fit_scale_centers",
    "sample_weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

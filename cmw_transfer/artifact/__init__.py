"""The weighting-net artifact: the net, its scale families, its file format.

Layers, bottom to top: ``net`` (the module) <- ``fileformat``, ``curves`` <- ``card`` <- ``hub`` (the Hub
mixin's save / load / push, registered with ``net`` on import). Importing this package loads ``hub``, so
``CMWNet.save_pretrained`` and ``CMWNet.from_pretrained`` work however ``CMWNet`` was imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from cmw_transfer.artifact import hub as _hub  # noqa: F401  (registers the persistence backend)
from cmw_transfer.artifact.net import CMWNet

_SCALES = ("DegenerateScalesWarning", "assign_families", "fit_families", "fit_scale_centers")

__all__ = ["CMWNet", *_SCALES]


def __getattr__(name: str) -> Any:  # scikit-learn only when the families are needed
    if name in _SCALES:
        return getattr(importlib.import_module("cmw_transfer.artifact.scales"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

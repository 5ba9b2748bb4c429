"""Held-out per-class sets (e.g. a clean, balanced meta set carved out before any bias is injected)."""

from __future__ import annotations

import numpy as np

from cmw_transfer.dataset.base import LabeledDataset
from cmw_transfer.errors import UserError


def split_per_class(ds: LabeledDataset, n_per_class: int, *, seed: int = 0) -> tuple[LabeledDataset, LabeledDataset]:
    """``(rest, held_out)`` where ``held_out`` has exactly ``n_per_class`` random samples of every class that has any.

    Classes are taken from ``clean_targets`` when known (so a meta set is balanced in the true classes),
    else from ``targets``. Both parts keep the original sample order.
    """
    if int(n_per_class) < 1:
        raise UserError(f"n_per_class must be >= 1, got {n_per_class}")
    labels = ds.clean_targets if ds.clean_targets is not None else ds.targets
    counts = np.bincount(labels, minlength=ds.num_classes)
    short = np.flatnonzero((counts > 0) & (counts < n_per_class))  # a class without samples has none to hold out
    if short.size:
        raise UserError(f"{ds.name}: class {int(short[0])} has only {int(counts[short[0]])} samples, fewer than the "
                        f"{n_per_class} per class requested ({short.size} such classes); ask for fewer")
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=int(n_per_class), replace=False)
                           for c in np.flatnonzero(counts > 0)])
    mask = np.zeros(len(ds), dtype=bool)
    mask[held] = True
    return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask))

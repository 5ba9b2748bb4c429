"""Long-tailed subsampling (Cui et al. / LDAM style): class i keeps ``floor(n_max * IF**(-i/(C-1)))`` samples.

Class 0 is the head, class C-1 the tail, so the largest / smallest kept count is the imbalance factor IF.
``n_max`` is the largest count every class can supply: ``min(max_count, min_i floor(count_i / IF**(-i/(C-1))))``
(for a balanced source that is the per-class count), so the kept counts always match the formula exactly.

``IF ** x`` is a libm power whose last bit varies between CPUs, and ``floor`` of a product that should be an
integer (``500 * 10 ** -1``) would then vary too; every floor is taken of the value plus ``1e-9`` relative, so
the counts are the same on every machine.
"""

from __future__ import annotations

import math

import numpy as np

from cmw_transfer.bias.result import check_labels
from cmw_transfer.errors import UserError
from cmw_transfer.parsing import ascii_float


def check_imbalance(imbalance_factor: float) -> float:
    if isinstance(imbalance_factor, (str, bool)):  # text (a config file): ASCII digits only, as on the command line
        value = ascii_float(imbalance_factor, "imbalance factor", finite=False)
    else:
        try:
            value = float(imbalance_factor)
        except (TypeError, ValueError):
            raise UserError(f"imbalance factor must be a number >= 1, got {imbalance_factor!r}") from None
    if not np.isfinite(value) or value < 1.0:
        raise UserError(f"imbalance factor must be >= 1 (largest / smallest class), got {value:g}; e.g. 100")
    return value


def long_tail_counts(class_counts: np.ndarray | list[int], imbalance_factor: float) -> np.ndarray:
    """The exact per-class counts :func:`long_tail_indices` keeps for these available counts."""
    counts = np.asarray(class_counts, dtype=np.int64)
    imbalance_factor = check_imbalance(imbalance_factor)
    c = counts.size
    if c == 1:
        return counts.copy()
    ratio = np.array([math.pow(imbalance_factor, -i / (c - 1)) for i in range(c)])
    n_max = int(min(counts.max(), _stable_floor(counts / ratio).min()))
    if n_max < 1:
        empty = np.flatnonzero(counts == 0).tolist()
        raise UserError(f"cannot build a long tail: class(es) {empty[:10]} have no samples")
    return _stable_floor(n_max * ratio).astype(np.int64)


def _stable_floor(x: np.ndarray) -> np.ndarray:
    return np.floor(x * (1.0 + 1e-9))


def long_tail_indices(
    labels: np.ndarray | list[int], num_classes: int, imbalance_factor: float, *, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a random long-tailed subset: exactly ``long_tail_counts`` samples per class."""
    y = check_labels(labels, num_classes)
    want = long_tail_counts(np.bincount(y, minlength=num_classes), imbalance_factor)
    rng = np.random.default_rng(seed)
    kept = [rng.choice(np.flatnonzero(y == c), size=int(n), replace=False) for c, n in enumerate(want)]
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)

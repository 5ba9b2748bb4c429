"""What every noise generator returns, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmw_transfer.errors import UserError
from cmw_transfer.parsing import ascii_float


@dataclass(frozen=True)
class NoiseResult:
    """New labels plus what the corruption actually did (not what was asked for).

    ``noise_rate`` is ``mean(labels != input labels)``; ``transition[i, j]`` is the realised fraction of
    samples of input class ``i`` that now carry label ``j`` (rows sum to 1; a class with no samples gets the
    identity row).
    """

    labels: np.ndarray
    noise_rate: float
    transition: np.ndarray


def check_labels(labels: np.ndarray | list[int], num_classes: int) -> np.ndarray:
    """Labels as an int64 vector in ``0..num_classes-1``, or a UserError that says which one is wrong."""
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise UserError(f"labels must be a 1-D vector, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise UserError(f"label {int(arr[bad[0]])} at index {int(bad[0])} is outside 0..{num_classes - 1} "
                        f"({bad.size} such labels); fix the labels or the class count")
    return arr


def check_rate(rate: float, what: str = "noise rate") -> float:
    """A rate in [0, 1): 1.0 would leave no clean label to learn from."""
    if isinstance(rate, (str, bool)):  # text (--noise sym:0.4): ASCII digits only, float() would read any script's
        try:
            value = ascii_float(rate, what)
        except UserError as exc:
            raise UserError(f"{exc}; a rate is in [0, 1), e.g. 0.4 for 40% noise") from None
    else:
        try:
            value = float(rate)
        except (TypeError, ValueError):
            raise UserError(f"{what} must be a number in [0, 1), got {rate!r}") from None
    if not 0.0 <= value < 1.0:
        raise UserError(f"{what} must be in [0, 1), got {value:g}; e.g. 0.4 for 40% noise")
    return value


def realised(old: np.ndarray, new: np.ndarray, num_classes: int) -> NoiseResult:
    """Package new labels with the realised rate and row-normalised transition matrix."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (old, new), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    transition = np.where(rows > 0, counts / np.maximum(rows, 1.0), np.eye(num_classes))
    rate = float(np.mean(old != new)) if old.size else 0.0
    return NoiseResult(labels=new.astype(np.int64, copy=False), noise_rate=rate, transition=transition)

"""Feature-independent label noise: symmetric (uniform) and asymmetric (fixed class map)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cmw_transfer.bias.maps import resolve_map
from cmw_transfer.bias.result import NoiseResult, check_labels, check_rate, realised
from cmw_transfer.errors import UserError


def symmetric_noise(
    labels: np.ndarray | list[int], num_classes: int, rate: float, *, include_true: bool = False, seed: int = 0
) -> NoiseResult:
    """Uniform noise: each label is corrupted with probability ``rate``.

    ``include_true=False`` (default, PLC's ``noisify_with_P``): a corrupted label is drawn uniformly from the
    *other* C-1 classes, so the expected noise rate equals ``rate``. ``include_true=True`` (DivideMix style):
    it is drawn from all C classes, so it can land on the true class and the expected noise rate is
    ``rate * (C-1)/C``.
    """
    y = check_labels(labels, num_classes)
    rate = check_rate(rate)
    if num_classes < 2:
        raise UserError("symmetric noise needs at least 2 classes")
    rng = np.random.default_rng(seed)
    corrupt = rng.random(y.size) < rate
    if include_true:
        drawn = rng.integers(0, num_classes, size=y.size)
    else:
        drawn = (y + rng.integers(1, num_classes, size=y.size)) % num_classes
    return realised(y, np.where(corrupt, drawn, y), num_classes)


def asymmetric_noise(
    labels: np.ndarray | list[int],
    num_classes: int,
    rate: float,
    *,
    mapping: str | Mapping[int, int] | np.ndarray = "auto",
    seed: int = 0,
) -> NoiseResult:
    """Class-dependent noise: a label of a source class moves to its map target with probability ``rate``.

    Maps (see :mod:`cmw_transfer.bias.maps`): ``cifar10`` (truck->automobile, bird->airplane, deer->horse,
    cat<->dog), ``cifar100`` (next class of the same super-class, cyclic), ``digits``, ``pairflip`` (i -> i+1
    mod C) or ``auto`` (chosen from the class count). Classes the map leaves alone are never touched, so the
    realised overall rate is ``rate`` times the share of samples in source classes.
    """
    y = check_labels(labels, num_classes)
    rate = check_rate(rate)
    target = resolve_map(mapping, num_classes)
    rng = np.random.default_rng(seed)
    flip = rng.random(y.size) < rate
    return realised(y, np.where(flip, target[y], y), num_classes)

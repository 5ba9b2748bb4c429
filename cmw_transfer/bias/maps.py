"""Fixed class maps for asymmetric (class-dependent) label noise.

A map is an int vector ``target`` of length C: class ``i`` flips to ``target[i]``; ``target[i] == i`` means
class ``i`` is never corrupted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cmw_transfer.errors import UserError

# PLC / CMW-Net CIFAR-10 map: truck->automobile, bird->airplane, deer->horse, cat<->dog (both directions).
CIFAR10_FLIPS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# Digits (0-9), built like the CIFAR-10 map so that the noisy counts split into three size groups: sources
# 7->1, 4->9, 5->6 lose labels, receivers 1, 9, 6 gain them, 3<->8 swap (net zero), 0 and 2 are untouched.
DIGITS_FLIPS = {7: 1, 4: 9, 5: 6, 3: 8, 8: 3}

# Fashion-MNIST (0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag,
# 9 Ankle boot), built like the CIFAR-10 map from the pairs a classifier confuses: the literature's three one-way
# flips T-shirt/top->Shirt, Pullover->Coat and Sandal->Sneaker (sources lose labels, receivers gain them) and a
# swap Trouser<->Dress (net zero; the two long, narrow silhouettes: each is the other's first or third confusion
# under the clean-label eta); Bag and Ankle boot are untouched. So the noisy counts split into three size groups
# (1 - r, 1, 1 + r) and asym:RATE changes RATE x 5/10 of a balanced set's labels, as the CIFAR-10 and digits maps.
# The eta confusions that back each pair (scripts/eta_compare.py's pooled-knn, 12,000 samples): T-shirt->Shirt 11%,
# Pullover->Coat 13%, Sandal->Sneaker 8%, Trouser->Dress 3% (Trouser's largest), Dress->Trouser 3%.
FASHION_MNIST_FLIPS = {0: 6, 2: 4, 5: 7, 1: 3, 3: 1}

# The official CIFAR-100 fine -> coarse (super-class) table: fine label i belongs to super-class COARSE[i].
CIFAR100_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
], dtype=np.int64)

MAP_NAMES = ("auto", "cifar10", "cifar100", "cifar100-blocks", "digits", "fashion-mnist", "pairflip")


def _from_flips(flips: Mapping[int, int], num_classes: int, name: str) -> np.ndarray:
    target = np.arange(num_classes, dtype=np.int64)
    for src, dst in flips.items():
        if not (0 <= int(src) < num_classes and 0 <= int(dst) < num_classes):
            raise UserError(f"{name} asymmetric map {src}->{dst} does not fit {num_classes} classes")
        target[int(src)] = int(dst)
    return target


def cifar100_map() -> np.ndarray:
    """Each fine class -> the next fine class (by label number) of its real super-class, cyclically."""
    target = np.empty(100, dtype=np.int64)
    for coarse in range(20):
        members = np.flatnonzero(CIFAR100_COARSE == coarse)
        target[members] = np.roll(members, -1)
    return target


def cifar100_blocks_map() -> np.ndarray:
    """PLC's version: treats labels 5k..5k+4 as a super-class (they are not, in CIFAR-100's alphabetical order)."""
    i = np.arange(100)
    return (i // 5) * 5 + (i % 5 + 1) % 5


def pairflip_map(num_classes: int) -> np.ndarray:
    """Generic pair-flip for any class count: class i -> i+1, the last class -> 0."""
    return (np.arange(num_classes, dtype=np.int64) + 1) % num_classes


def resolve_map(mapping: str | Mapping[int, int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Turn a map name (see MAP_NAMES), a ``{src: dst}`` dict or a target vector into a target vector.

    ``"auto"`` only knows the class count: 10 -> cifar10, 100 -> cifar100, anything else -> pairflip.
    """
    if isinstance(mapping, np.ndarray) or (isinstance(mapping, (list, tuple))):
        target = np.asarray(mapping, dtype=np.int64)
        if target.shape != (num_classes,) or np.any((target < 0) | (target >= num_classes)):
            raise UserError(f"an asymmetric map vector needs {num_classes} entries in 0..{num_classes - 1}")
        return target
    if isinstance(mapping, Mapping):
        return _from_flips(mapping, num_classes, "custom")
    name = str(mapping)
    if name == "auto":
        name = {10: "cifar10", 100: "cifar100"}.get(num_classes, "pairflip")
    fixed = {"cifar10": 10, "digits": 10, "fashion-mnist": 10, "cifar100": 100, "cifar100-blocks": 100}
    if name in fixed and fixed[name] != num_classes:
        raise UserError(f"asymmetric map {name!r} is for {fixed[name]} classes, the data has {num_classes}; "
                        "use mapping='pairflip' for other class counts")
    if name == "cifar10":
        return _from_flips(CIFAR10_FLIPS, 10, name)
    if name == "digits":
        return _from_flips(DIGITS_FLIPS, 10, name)
    if name == "fashion-mnist":
        return _from_flips(FASHION_MNIST_FLIPS, 10, name)
    if name == "cifar100":
        return cifar100_map()
    if name == "cifar100-blocks":
        return cifar100_blocks_map()
    if name == "pairflip":
        if num_classes < 2:
            raise UserError("pair-flip noise needs at least 2 classes")
        return pairflip_map(num_classes)
    raise UserError(f"unknown asymmetric map {name!r}; known: {', '.join(MAP_NAMES)}")

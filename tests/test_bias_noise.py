"""Symmetric and asymmetric noise against their definitions (exact maps, statistical rates)."""

from __future__ import annotations

import numpy as np
import pytest

from cmw_transfer.bias import asymmetric_noise, resolve_map, symmetric_noise
from cmw_transfer.bias.maps import CIFAR100_COARSE
from cmw_transfer.errors import UserError

N_PER_CLASS = 2000


def balanced(num_classes: int, per_class: int = N_PER_CLASS) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def test_symmetric_excluding_true_class_hits_rate_and_never_keeps_a_corrupted_label():
    y = balanced(10)
    res = symmetric_noise(y, 10, 0.4, seed=1)
    assert abs(res.noise_rate - 0.4) < 0.015
    assert res.noise_rate == pytest.approx(np.mean(res.labels != y))
    t = res.transition
    assert np.allclose(t.sum(axis=1), 1.0)
    assert np.all(np.abs(np.diag(t) - 0.6) < 0.04)
    off = t[~np.eye(10, dtype=bool)]
    assert np.all(np.abs(off - 0.4 / 9) < 0.02)


def test_symmetric_including_true_class_has_rate_times_c_minus_1_over_c():
    y = balanced(10)
    res = symmetric_noise(y, 10, 0.5, include_true=True, seed=2)
    assert abs(res.noise_rate - 0.5 * 9 / 10) < 0.015
    off = res.transition[~np.eye(10, dtype=bool)]
    assert np.all(np.abs(off - 0.5 / 10) < 0.02)


def test_symmetric_is_reproducible_from_the_seed():
    y = balanced(5, 300)
    a, b, c = (symmetric_noise(y, 5, 0.3, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert a.labels.dtype == np.int64


def test_rate_zero_changes_nothing():
    y = balanced(4, 50)
    assert np.array_equal(symmetric_noise(y, 4, 0.0).labels, y)
    assert np.array_equal(asymmetric_noise(y, 4, 0.0).labels, y)
    assert np.array_equal(symmetric_noise(y, 4, 0.0).transition, np.eye(4))


def test_cifar10_map_is_exact_and_rate_per_source_class():
    y = balanced(10)
    res = asymmetric_noise(y, 10, 0.3, mapping="cifar10", seed=3)
    expected = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
    changed = res.labels != y
    for src in range(10):
        moved = res.labels[changed & (y == src)]
        if src in expected:
            assert set(moved.tolist()) == {expected[src]}
            assert abs(res.transition[src, expected[src]] - 0.3) < 0.035
        else:
            assert moved.size == 0 and res.transition[src, src] == 1.0
    assert abs(res.noise_rate - 0.3 * 5 / 10) < 0.015


def test_cifar100_map_is_the_next_class_of_the_real_superclass():
    target = resolve_map("cifar100", 100)
    assert np.all(CIFAR100_COARSE[target] == CIFAR100_COARSE)  # stays inside the super-class
    assert np.all(target != np.arange(100))
    assert np.bincount(CIFAR100_COARSE).tolist() == [5] * 20
    cycle = np.arange(100)
    for _ in range(5):
        cycle = target[cycle]
    assert np.array_equal(cycle, np.arange(100))  # cyclic within each 5-class super-class
    # aquatic mammals = beaver 4, dolphin 30, otter 55, seal 72, whale 95
    assert [target[4], target[30], target[55], target[72], target[95]] == [30, 55, 72, 95, 4]
    y = balanced(100, 200)
    res = asymmetric_noise(y, 100, 0.2, seed=4)  # auto -> cifar100 for 100 classes
    changed = res.labels != y
    assert np.array_equal(res.labels[changed], target[y[changed]])
    assert abs(res.noise_rate - 0.2) < 0.015


def test_plc_block_map_and_digits_map():
    blocks = resolve_map("cifar100-blocks", 100)
    assert blocks[:10].tolist() == [1, 2, 3, 4, 0, 6, 7, 8, 9, 5]
    digits = resolve_map("digits", 10)
    assert digits.tolist() == [0, 1, 2, 8, 9, 6, 6, 1, 3, 9]


def test_pairflip_for_any_class_count():
    y = balanced(7, 3000)
    res = asymmetric_noise(y, 7, 0.25, mapping="pairflip", seed=5)
    changed = res.labels != y
    assert np.array_equal(res.labels[changed], (y[changed] + 1) % 7)
    assert np.all(np.abs(np.diag(res.transition) - 0.75) < 0.03)
    assert abs(res.noise_rate - 0.25) < 0.015


def test_auto_map_follows_the_class_count():
    assert np.array_equal(resolve_map("auto", 10), resolve_map("cifar10", 10))
    assert np.array_equal(resolve_map("auto", 100), resolve_map("cifar100", 100))
    assert np.array_equal(resolve_map("auto", 6), (np.arange(6) + 1) % 6)
    assert resolve_map({0: 2}, 3).tolist() == [2, 1, 2]


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan"), "abc"])
def test_rates_outside_zero_one_are_rejected(rate):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        symmetric_noise([0, 1], 2, rate)
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        asymmetric_noise([0, 1], 2, rate)


def test_bad_labels_and_maps_are_user_errors():
    with pytest.raises(UserError, match=r"label 5 at index 1 is outside 0\.\.2"):
        symmetric_noise([0, 5], 3, 0.2)
    with pytest.raises(UserError, match="for 10 classes"):
        asymmetric_noise([0, 1], 5, 0.2, mapping="cifar10")
    with pytest.raises(UserError, match="unknown asymmetric map 'nope'"):
        asymmetric_noise([0, 1], 5, 0.2, mapping="nope")
    with pytest.raises(UserError, match="integers"):
        symmetric_noise([0.5, 1.0], 2, 0.2)

"""Long-tail subsampling: exact counts n_i = floor(n_max * IF**(-i/(C-1)))."""

from __future__ import annotations

import numpy as np
import pytest

from cmw_transfer.bias import long_tail_counts, long_tail_indices
from cmw_transfer.errors import UserError


@pytest.mark.parametrize(("num_classes", "factor"), [(10, 100), (10, 10), (100, 50), (3, 2.5)])
def test_balanced_source_gives_exact_formula_counts(num_classes, factor):
    n = 500
    y = np.repeat(np.arange(num_classes), n)
    idx = long_tail_indices(y, num_classes, factor, seed=0)
    expected = [int(np.floor(n * factor ** (-i / (num_classes - 1)))) for i in range(num_classes)]
    assert np.bincount(y[idx], minlength=num_classes).tolist() == expected
    assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
    assert expected[0] / expected[-1] == pytest.approx(factor, rel=0.05)


def test_unbalanced_source_uses_the_largest_feasible_n_max():
    counts = np.array([100, 40, 90, 10])
    y = np.repeat(np.arange(4), counts)
    idx = long_tail_indices(y, 4, 10, seed=1)
    got = np.bincount(y[idx], minlength=4)
    ratio = 10.0 ** (-np.arange(4) / 3)
    n_max = int(min(counts.max(), np.floor(counts / ratio).min()))  # class 1 limits it: 40 / 10**(-1/3) = 86
    assert n_max == 86
    assert got.tolist() == np.floor(n_max * ratio).astype(int).tolist() == long_tail_counts(counts, 10).tolist()
    assert np.all(got <= counts)


def test_seed_controls_which_samples_are_kept():
    y = np.repeat(np.arange(5), 100)
    a, b, c = (long_tail_indices(y, 5, 20, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(y[a]), np.bincount(y[c]))


def test_factor_one_truncates_to_the_smallest_class():
    y = np.repeat(np.arange(3), [5, 9, 7])
    assert np.bincount(y[long_tail_indices(y, 3, 1)]).tolist() == [5, 5, 5]


def test_bad_factor_and_empty_class():
    y = np.repeat(np.arange(3), 10)
    with pytest.raises(UserError, match=">= 1"):
        long_tail_indices(y, 3, 0.5)
    with pytest.raises(UserError, match="no samples"):
        long_tail_indices(np.array([0, 0, 2]), 3, 10)

"""PMD noise: formulas, top-2-only flips, statistical keep rates, rate->factor bisection, eta estimation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmw_transfer.bias import estimate_eta, expected_pmd_rate, pmd_factor_for_rate, pmd_noise
from cmw_transfer.bias import eta as eta_module
from cmw_transfer.bias.pmd import keep_probability, top2
from cmw_transfer.dataset import InMemoryDataset, create_dataset
from cmw_transfer.errors import UserError


def synthetic_eta(n: int = 20000, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet probability rows and labels that equal the top-1 class for ~90% of samples."""
    rng = np.random.default_rng(seed)
    eta = rng.dirichlet(np.full(c, 0.3), size=n)
    y = eta.argmax(axis=1)
    wrong = rng.random(n) < 0.1
    y[wrong] = rng.integers(0, c, size=wrong.sum())
    return eta, y


def test_keep_probability_matches_the_three_tau_definitions():
    d = np.array([0.0, 0.2, 0.5, 1.0])
    assert np.allclose(keep_probability(d, 1), 1 - (0.5 - 0.5 * d**2))
    assert np.allclose(keep_probability(d, 2), 1 - (1 - d**3))
    assert np.allclose(keep_probability(d, 3), 1 - (1 - (d**3 + d**2 + d) / 3))
    with pytest.raises(UserError, match="1, 2 or 3"):
        keep_probability(d, 4)


def test_top2_breaks_ties_by_lower_class_index():
    u, s, delta = top2(np.array([[0.2, 0.4, 0.4], [0.5, 0.1, 0.4]]))
    assert u.tolist() == [1, 0] and s.tolist() == [2, 2]
    assert np.allclose(delta, [0.0, 0.1])


@pytest.mark.parametrize("noise_type", [1, 2, 3])
def test_pmd_labels_are_top1_or_top2_with_the_defined_probability(noise_type):
    eta, y = synthetic_eta()
    factor = 1.3
    res = pmd_noise(y, eta, noise_type, factor, seed=noise_type)
    u, s, delta = top2(eta)
    assert np.all((res.labels == u) | (res.labels == s))  # never a third class
    q = np.minimum(keep_probability(delta, noise_type) / factor, 1.0)
    kept = res.labels == u
    for lo, hi in [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]:
        band = (delta >= lo) & (delta < hi)
        if band.sum() > 500:
            assert abs(kept[band].mean() - q[band].mean()) < 0.04
    assert abs(res.noise_rate - expected_pmd_rate(y, eta, noise_type, factor)) < 0.012
    assert res.noise_rate == pytest.approx(np.mean(res.labels != y))


def test_pmd_is_reproducible_and_more_factor_means_more_noise():
    eta, y = synthetic_eta(5000)
    assert np.array_equal(pmd_noise(y, eta, 1, 1.4, seed=3).labels, pmd_noise(y, eta, 1, 1.4, seed=3).labels)
    rates = [expected_pmd_rate(y, eta, 1, f) for f in (1.0, 1.43, 3.4)]
    assert rates[0] < rates[1] < rates[2]


@pytest.mark.parametrize("noise_type", [1, 2, 3])
def test_factor_bisection_hits_the_target_rate(noise_type):
    eta, y = synthetic_eta()
    factor = pmd_factor_for_rate(y, eta, noise_type, 0.35)
    assert expected_pmd_rate(y, eta, noise_type, factor) == pytest.approx(0.35, abs=1e-4)
    res = pmd_noise(y, eta, noise_type, factor, seed=11)
    assert abs(res.noise_rate - 0.35) < 0.015


def test_unreachable_rate_and_bad_inputs_are_user_errors():
    eta, y = synthetic_eta(2000)
    with pytest.raises(UserError, match="can only reach rates in"):
        pmd_factor_for_rate(y, eta, 1, 0.01)  # below the top-1 error of eta
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        pmd_factor_for_rate(y, eta, 1, 1.0)
    with pytest.raises(UserError, match="shape"):
        pmd_noise(y, eta[:10], 1, 1.0)
    with pytest.raises(UserError, match="positive"):
        pmd_noise(y, eta, 1, 0.0)


def test_estimate_eta_on_digits_is_out_of_sample_and_cached(tmp_path, monkeypatch):
    ds = create_dataset("digits")
    eta = estimate_eta(ds, cache_dir=tmp_path)
    assert eta.shape == (len(ds), 10)
    assert np.allclose(eta.sum(axis=1), 1.0)
    accuracy = np.mean(eta.argmax(axis=1) == ds.clean_targets)
    assert 0.9 < accuracy < 0.995  # good but not memorised: leave-one-out
    assert len(list(tmp_path.glob("eta-*.npy"))) == 1
    monkeypatch.setattr(eta_module, "_knn_eta", lambda *a, **k: pytest.fail("cache not used"))
    assert np.array_equal(estimate_eta(ds, cache_dir=tmp_path), eta)


def test_estimate_eta_torch_path_on_a_small_image_dataset(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    data = rng.integers(0, 60, size=(120, 8, 8, 3), dtype=np.uint8)
    data[np.arange(120), :, :, y] += 180  # class = brightest channel: easy to learn
    ds = InMemoryDataset("toy", data, y, 3, clean_targets=y)
    torch.manual_seed(0)
    eta = estimate_eta(ds, method="torch", epochs=8, batch_size=32, cache_dir=tmp_path)
    assert eta.shape == (120, 3) and np.allclose(eta.sum(axis=1), 1.0)
    assert np.mean(eta.argmax(axis=1) == y) > 0.8
    assert len(list(tmp_path.glob("eta-*.npy"))) == 1
    with pytest.raises(UserError, match="'auto', 'knn', 'pooled-knn', 'torch'"):
        estimate_eta(ds, method="bogus")

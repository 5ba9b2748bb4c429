"""Biases at Fashion-MNIST's size: the pooled eta is exact (same bits as the exact knn, any thread count or BLAS
kernel), the Fashion-MNIST class map, and the digests of every bias on the real files (pinned: they must never
change on any machine; changing the bias code on purpose means changing them on purpose, and saying so)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from cmw_transfer.bias import estimate_eta
from cmw_transfer.bias import eta as eta_module
from cmw_transfer.bias.apply import apply_bias
from cmw_transfer.bias.eta import class_distances, pooled_class_distances, pooled_features
from cmw_transfer.bias.maps import resolve_map
from cmw_transfer.bias.spec import BiasSpec, parse_noise
from cmw_transfer.dataset import InMemoryDataset, create_dataset

REPO = Path(__file__).resolve().parents[1]
# create_dataset("fashion-mnist", noise=SPEC, imbalance=IF), train split, seed 0
DIGESTS = {
    ("pmd1:0.35+asym:0.3", None): "2ece8bab4e989a18",  # the fashion-mnist-pmd preset
    ("sym:0.4", None): "dd32a9850e8eb0c2",
    ("asym:0.4", None): "a7e0eb75c552eef1",  # the fashion-mnist map
    ("asym:0.4:pairflip", None): "abf414409a396708",
    ("pmd2:0.35", None): "2c0cdd607be163f4",
    ("pmd3:0.35", None): "825b72175e3f542a",
    ("sym:0.2", 10.0): "e2d6d3dde9239a1c",
    ("", 50.0): "43bd387b0c29ca28",
}


def toy_images(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey 28x28 uint8 images whose class is a bright band at a class-dependent row, plus noise; unequal classes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(10, size=n, p=np.arange(1, 11) / 55.0)
    x = rng.integers(0, 90, size=(n, 28, 28, 1), dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, 2 + 2 * c:5 + 2 * c, :, 0] += 160
    return x, y.astype(np.int64)


def test_pooled_features_are_rounded_box_sums():
    white = np.full((2, 28, 28, 1), 255, dtype=np.uint8)
    white[1] = 0
    q = pooled_features(white)
    assert q.shape == (2, 196) and (q[0] == 127).all() and (q[1] == 0).all()
    one = np.zeros((1, 28, 28, 1), dtype=np.uint8)
    one[0, 0, 0, 0] = 255  # a quarter of the first 2x2 box: 127/4 = 31.75 -> 32
    assert pooled_features(one)[0, 0] == 32 and pooled_features(one)[0, 1:].sum() == 0
    assert pooled_features(np.zeros((1, 32, 32, 3), dtype=np.uint8)).shape == (1, 192)  # 4x4 boxes, 3 channels
    digits = create_dataset("digits")
    assert pooled_features(digits.data).shape == (len(digits), 64)  # 8x8 float: no pooling, 7-bit values


@pytest.mark.parametrize("rows", [1024, 97])
def test_pooled_distances_equal_the_exact_float64_knn(rows):
    """Another implementation (float64, unsorted, row blocks of 1024) gives the same bits: no rounding anywhere."""
    x, y = toy_images()
    q = pooled_features(x)
    y[:3] = 9  # a class with few samples, and one class absent altogether
    y[y == 8] = 7
    exact = class_distances(q.astype(np.float64), y, 10)
    fast = pooled_class_distances(q, y, 10, rows=rows)
    assert np.array_equal(fast, exact)
    assert np.isinf(fast[:, 8]).all()



def at_one_and_two_threads(fn):
    """``fn()`` with torch and BLAS limited to 1 thread, then to 2 (torch's setting restored)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with threadpool_limits(n):
                results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results

def test_pooled_distances_do_not_depend_on_threads():
    x, y = toy_images(2000, seed=1)
    q = pooled_features(x)
    results = at_one_and_two_threads(lambda: pooled_class_distances(q, y, 10))
    assert np.array_equal(results[0], results[1])


def test_pooled_distances_under_other_cpu_kernels():
    """Another BLAS kernel, NumPy SIMD path and thread count stand in for another CPU model."""
    code = ("import hashlib, numpy as np; from tests.test_bias_fashion import toy_images;"
            "from cmw_transfer.bias.eta import pooled_class_distances, pooled_features;"
            "x, y = toy_images(); print(hashlib.sha256(pooled_class_distances(pooled_features(x), y, 10).tobytes())"
            ".hexdigest())")
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott", "OMP_NUM_THREADS": "1",
           "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX", "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    x, y = toy_images()
    assert out.stdout.strip() == hashlib.sha256(pooled_class_distances(pooled_features(x), y, 10).tobytes()).hexdigest()


def test_auto_picks_pooled_knn_for_large_grey_sets_only(tmp_path, monkeypatch):
    x, y = toy_images(600)
    grey = InMemoryDataset("toy", x, y, 10, clean_targets=y)
    colour = InMemoryDataset("toy", np.repeat(x, 3, axis=3), y, 10, clean_targets=y)
    monkeypatch.setattr(eta_module, "KNN_MAX_SAMPLES", 100)
    calls = []
    monkeypatch.setattr(eta_module, "_knn_eta", lambda ds, pooled=False: calls.append(pooled) or np.eye(10)[y])
    monkeypatch.setattr(eta_module, "_torch_eta", lambda *a: calls.append("torch") or np.eye(10)[y])
    estimate_eta(grey, cache_dir=tmp_path / "a")
    estimate_eta(colour, cache_dir=tmp_path / "b")
    assert calls == [True, "torch"]


def test_pooled_eta_cache_is_keyed_on_the_images(tmp_path):
    x, y = toy_images(300)
    ds = InMemoryDataset("toy", x, y, 10, clean_targets=y)
    first = estimate_eta(ds, method="pooled-knn", cache_dir=tmp_path)
    x2 = x.copy()
    x2[0] = 255 - x2[0]
    second = estimate_eta(InMemoryDataset("toy", x2, y, 10, clean_targets=y), method="pooled-knn", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("eta-*.npy"))) == 2 and not np.array_equal(first, second)
    assert 0.9 < np.mean(first.argmax(axis=1) == y)  # the toy classes are easy, and scored out of sample


def test_fashion_map_pairs_and_size_groups():
    target = resolve_map("fashion-mnist", 10)
    assert {i: int(t) for i, t in enumerate(target) if t != i} == {0: 6, 2: 4, 5: 7, 1: 3, 3: 1}
    y = np.repeat(np.arange(10), 1000)
    x = np.zeros((y.size, 28, 28, 1), dtype=np.uint8)
    ds = InMemoryDataset("fashion-mnist", x, y, 10, clean_targets=y)
    for spec in ("asym:0.4", "asym:0.4:auto", "asym:0.4:fashion-mnist"):
        noisy = apply_bias(ds, BiasSpec(parse_noise(spec)), seed=0)
        assert noisy.bias_log[-1]["map"] == "fashion-mnist"
        moved = noisy.targets != y
        assert set(np.unique(y[moved])) == {0, 1, 2, 3, 5}
        assert np.array_equal(noisy.targets[moved], target[y[moved]])
        counts = noisy.class_counts()
        assert (counts[[0, 2, 5]] < 700).all() and (counts[[4, 6, 7]] > 1300).all() and (counts[[8, 9]] == 1000).all()
        assert abs(noisy.noise_rate() - 0.2) < 0.02


# --- the real files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fashion_eta(fashion_dir, tmp_path_factory):
    """eta of the clean train split, once for the module (cached in a temporary folder, never the user's)."""
    cache = tmp_path_factory.mktemp("eta")
    clean = create_dataset("fashion-mnist")
    return clean, estimate_eta(clean, cache_dir=cache), cache


@pytest.mark.real_data
def test_every_bias_digest_is_pinned(fashion_eta):
    clean, eta, _ = fashion_eta
    for (noise, imbalance), digest in DIGESTS.items():
        ds = apply_bias(clean, BiasSpec(parse_noise(noise), imbalance), seed=0, eta=eta if "pmd" in noise else None)
        assert ds.labels_digest() == digest, (noise, imbalance)


@pytest.mark.real_data
def test_the_preset_is_pmd1_then_the_fashion_map(fashion_eta):
    _, eta, cache = fashion_eta
    ds = create_dataset("fashion-mnist-pmd", eta_options={"cache_dir": cache})
    assert ds.labels_digest() == DIGESTS[("pmd1:0.35+asym:0.3", None)]
    assert [step["step"] for step in ds.bias_log] == ["pmd1:0.35", "asym:0.3"]
    assert ds.bias_log[-1]["map"] == "fashion-mnist" and 0.40 < ds.noise_rate() < 0.45
    assert 0.85 < np.mean(eta.argmax(axis=1) == ds.clean_targets) < 0.9  # a good, out-of-sample classifier


@pytest.mark.real_data
def test_real_subset_is_thread_independent(fashion_eta):
    clean, _, _ = fashion_eta
    keep = np.arange(0, 60000, 20)
    q = pooled_features(clean.data[keep])
    results = at_one_and_two_threads(lambda: pooled_class_distances(q, clean.clean_targets[keep], 10))
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], class_distances(q.astype(np.float64), clean.clean_targets[keep], 10))

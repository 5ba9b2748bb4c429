"""Biased labels are data: the same (dataset, split, bias, seed) gives the same labels on every machine.

The digests below were computed once and must never change on any machine or thread count; a different value
means the labels (and every number measured on them) differ. Changing the bias code on purpose means changing
these digests on purpose, and saying so.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from cmw_transfer.bias import estimate_eta
from cmw_transfer.bias.apply import apply_bias
from cmw_transfer.bias.imbalance import long_tail_counts
from cmw_transfer.dataset import create_dataset, resolve_source, split_per_class

DIGITS_PMD_TRAIN = "d73f95ca258957ed"  # create_dataset("digits-pmd"), seed 0
DIGITS_PMD_META_SOURCE = "bf0174e1a4e630da"  # metatrain --src digits-pmd: 10 clean per class held out, then the bias


def meta_train_source(seed: int = 0):
    base, bias = resolve_source("digits-pmd")
    rest, _meta = split_per_class(create_dataset(base), 10, seed=seed)
    return apply_bias(rest, bias, seed=seed)


def test_digits_pmd_train_split_digest_is_pinned():
    assert create_dataset("digits-pmd").labels_digest() == DIGITS_PMD_TRAIN


def test_digits_pmd_meta_train_source_digest_is_pinned():
    assert meta_train_source().labels_digest() == DIGITS_PMD_META_SOURCE


def test_digest_sees_labels_and_rows():
    ds = create_dataset("digits")
    flipped = ds.with_targets(np.where(np.arange(len(ds)) == 3, (ds.targets + 1) % 10, ds.targets))
    assert flipped.labels_digest() != ds.labels_digest()
    assert ds.subset(np.arange(len(ds) - 1)).labels_digest() != ds.labels_digest()
    assert ds.subset(np.arange(len(ds))).labels_digest() == ds.labels_digest()


@pytest.mark.parametrize("env", [{"OPENBLAS_CORETYPE": "Haswell", "OMP_NUM_THREADS": "2"},
                                 {"OPENBLAS_CORETYPE": "Prescott", "OMP_NUM_THREADS": "1",
                                  "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX"}])
def test_same_labels_under_other_cpu_kernels(env):
    """Other BLAS kernels, NumPy SIMD paths and thread counts stand in for another CPU model."""
    code = ("from tests.test_bias_digest import meta_train_source;"
            "from cmw_transfer.dataset import create_dataset;"
            "print(create_dataset('digits-pmd').labels_digest(), meta_train_source().labels_digest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [DIGITS_PMD_TRAIN, DIGITS_PMD_META_SOURCE]


def test_knn_eta_is_exact_integer_arithmetic():
    """The distances behind eta are integers, so a permutation of the samples permutes eta exactly."""
    ds = create_dataset("digits")
    eta = estimate_eta(ds)
    perm = np.random.default_rng(1).permutation(len(ds))
    eta_perm = estimate_eta(ds.subset(perm))
    assert np.array_equal(eta_perm, eta[perm])
    assert 0.95 < np.mean(eta.argmax(axis=1) == ds.clean_targets) < 0.995  # a good, out-of-sample classifier


def test_long_tail_counts_do_not_depend_on_the_last_bit_of_a_power():
    # 500 * 10 ** (-9/9) is 50 exactly in real numbers; the floor must not give 49 on any machine
    assert long_tail_counts([500] * 10, 10).tolist()[-1] == 50
    assert long_tail_counts([500] * 10, 10).tolist()[0] == 500


def test_metatrain_records_the_digest_of_the_labels_it_trained_on(tmp_path):
    """run.json and the artifact's provenance carry the digest, so two machines' runs can be compared."""
    import json

    out = subprocess.run([sys.executable, "-m", "cmw_transfer", "metatrain", "--src", "digits-pmd", "--epochs", "1",
                          "--warmup-epochs", "1", "--workers", "0", "--out", str(tmp_path / "net"), "--quiet"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "net" / "run.json").read_text())["labels_digest"] == DIGITS_PMD_META_SOURCE
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["provenance"]["source_labels_digest"] == DIGITS_PMD_META_SOURCE

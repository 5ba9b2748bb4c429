"""The --noise grammar, source presets, and apply_bias's documented order."""

from __future__ import annotations

import numpy as np
import pytest

from cmw_transfer.bias import (
    BiasSpec,
    apply_bias,
    asymmetric_noise,
    estimate_eta,
    long_tail_indices,
    parse_noise,
    pmd_factor_for_rate,
    pmd_noise,
    symmetric_noise,
)
from cmw_transfer.bias.apply import step_seed
from cmw_transfer.dataset import create_dataset, list_datasets, resolve_source
from cmw_transfer.errors import UserError


def test_parse_noise_examples_and_round_trip():
    assert parse_noise("sym:0.4+asym:0.2") == (("sym", 0.4), ("asym", 0.2))
    assert parse_noise("pmd1:0.35+asym:0.3") == (("pmd", 1, 0.35), ("asym", 0.3))
    assert parse_noise(" PMD3 : 0.7 + sym:0.1:incl + asym:0.2:pairflip ") == (
        ("pmd", 3, 0.7), ("sym", 0.1, "incl"), ("asym", 0.2, "pairflip"))
    assert parse_noise("sym:0.4:excl") == (("sym", 0.4),)
    assert parse_noise("") == parse_noise(None) == parse_noise("none") == ()
    spec = BiasSpec(parse_noise("pmd2:0.35+asym:0.3:cifar10+sym:0.1:incl"), imbalance=100)
    assert parse_noise(spec.noise_text()) == spec.noise
    assert str(spec) == "pmd2:0.35+asym:0.3:cifar10+sym:0.1:incl + imbalance:100"
    assert str(BiasSpec()) == "none" and BiasSpec().is_empty


@pytest.mark.parametrize(("text", "message"), [
    ("sym:1.0", r"in \[0, 1\)"),
    ("sym:-0.2", r"in \[0, 1\)"),
    ("asym:x", "must be a number"),
    ("gauss:0.2", "cannot parse noise step 'gauss:0.2'"),
    ("sym", "cannot parse noise step 'sym'"),
    ("sym:0.2+", "cannot parse noise step ''"),
    ("pmd4:0.3", "unknown PMD step"),
    ("asym:0.3+pmd1:0.35", "must come first"),
    ("asym:0.3:nomap", "unknown asymmetric map 'nomap'"),
    ("sym:0.3:maybe", "'incl'"),
])
def test_bad_noise_strings_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_noise(text)


def test_bad_imbalance_is_a_user_error():
    with pytest.raises(UserError, match=">= 1"):
        BiasSpec(imbalance=0.5)


def test_resolve_source_presets_and_extra_steps():
    assert resolve_source("digits-pmd") == ("digits", BiasSpec((("pmd", 1, 0.35), ("asym", 0.3))))
    assert resolve_source("cifar10-pmd") == ("cifar10", BiasSpec((("pmd", 1, 0.35), ("asym", 0.3))))
    name, bias = resolve_source("cifar10-pmd", noise="sym:0.1", imbalance=10)
    assert name == "cifar10" and bias.noise[-1] == ("sym", 0.1) and bias.imbalance == 10
    assert resolve_source("list:/x/train.txt", "sym:0.2") == ("list:/x/train.txt", BiasSpec((("sym", 0.2),)))
    with pytest.raises(UserError, match="must come first"):
        resolve_source("digits-pmd", noise="pmd1:0.2")
    with pytest.raises(UserError, match=r"unknown dataset 'emnist'; known: digits, fashion-mnist, .*folder:PATH"):
        resolve_source("emnist")
    with pytest.raises(UserError, match="needs a path"):
        resolve_source("list:")
    assert {"digits", "digits-pmd", "cifar10-pmd", "webvision-full", "mini-webvision", "imagenet-lt", "clothing1m",
            "animal-10n", "cifar100", "list:PATH", "folder:PATH"} <= set(list_datasets())


def test_apply_bias_order_is_long_tail_then_noise_left_to_right():
    ds = create_dataset("digits")
    seed = 5
    bias = BiasSpec(parse_noise("pmd1:0.3+asym:0.2+sym:0.1"), imbalance=5)
    out = apply_bias(ds, bias, seed=seed)
    # replay the documented order by hand with the same per-step seeds
    keep = long_tail_indices(ds.clean_targets, 10, 5, seed=step_seed(seed, 0))
    truth = ds.clean_targets[keep]
    eta = estimate_eta(ds.subset(keep), seed=seed)
    y1 = pmd_noise(truth, eta, 1, pmd_factor_for_rate(truth, eta, 1, 0.3), seed=step_seed(seed, 1)).labels
    y2 = asymmetric_noise(y1, 10, 0.2, mapping="digits", seed=step_seed(seed, 2)).labels
    y3 = symmetric_noise(y2, 10, 0.1, seed=step_seed(seed, 3)).labels
    assert np.array_equal(out.clean_targets, truth)
    assert np.array_equal(out.targets, y3)
    assert np.array_equal(out.rows, ds.rows[keep])
    assert np.bincount(out.clean_targets).tolist() == np.floor(
        np.bincount(truth)[0] * 5.0 ** (-np.arange(10) / 9)).astype(int).tolist()
    assert [entry["step"] for entry in out.bias_log] == ["imbalance:5", "pmd1:0.3", "asym:0.2", "sym:0.1"]
    assert out.bias_log[1]["noise_rate"] == pytest.approx(np.mean(y1 != truth), abs=1e-6)
    assert out.noise_rate() == pytest.approx(np.mean(y3 != truth))
    assert out.bias == bias


def test_apply_bias_uses_a_given_eta_and_measures_against_web_labels():
    ds = create_dataset("digits")
    web = ds.with_targets(ds.targets)
    web.clean_targets = None  # like real web data: no ground truth
    out = apply_bias(web, BiasSpec(parse_noise("asym:0.3")), seed=1)
    assert np.array_equal(out.clean_targets, ds.targets)
    changed = out.targets != ds.targets
    assert set(ds.targets[changed].tolist()) <= {3, 4, 5, 7, 8}  # the digits map's source classes
    eta = np.eye(10)[(ds.targets + 1) % 10] * 0.6 + np.eye(10)[ds.targets] * 0.4  # top-1 always wrong
    with pytest.raises(UserError, match="can only reach rates"):
        apply_bias(ds, BiasSpec(parse_noise("pmd1:0.35")), eta=eta)


def test_digits_pmd_is_noisy_unbalanced_and_deterministic():
    a = create_dataset("digits-pmd", seed=0)
    b = create_dataset("digits-pmd", seed=0)
    assert np.array_equal(a.targets, b.targets)
    assert 0.40 < a.noise_rate() < 0.47  # PMD 35% then asym 30% on the 5 source classes
    assert a.bias_log[0]["noise_rate"] == pytest.approx(0.35, abs=0.03)
    counts = a.class_counts()
    assert counts.max() / counts.min() > 1.6
    assert counts.sum() == len(a) == 1347
    clean = np.bincount(a.clean_targets, minlength=10)
    assert np.all(counts[[4, 5, 7]] < clean[[4, 5, 7]])  # asym sources lose labels
    assert np.all(counts[[1, 6, 9]] > clean[[1, 6, 9]])  # receivers gain them

"""The trust check of a frozen net (cmw_transfer.guards.trust_verdict) and apply's default normalisation."""

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.weighting.guards import TRUST_SIZE_CORR, spearman, trust_verdict


@pytest.mark.parametrize("seed", range(20))
def test_spearman_is_scipys_with_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 5, 12).tolist(), rng.normal(size=12).tolist()
    expected = spearmanr(x, y).statistic
    got = spearman(x, y)
    assert (got is None and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


TAIL = [200, 120, 80, 50, 30, 20, 12, 8, 6, 4]


def test_a_net_that_starves_the_rare_classes_of_a_tail_is_distrusted():
    rising = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1]  # the rarer the class, the lower its weight
    verdict = trust_verdict(rising, TAIL)
    assert verdict["verdict"] == "distrust" and verdict["size_weight_corr"] == pytest.approx(1.0)
    assert "rare classes" in verdict["reasons"][0]


def test_a_net_that_spares_the_rare_classes_or_a_balanced_target_is_trusted():
    assert trust_verdict([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9], TAIL)["verdict"] == "trust"
    balanced = [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]  # any order of weights: no tail to deepen
    verdict = trust_verdict(sorted(np.linspace(0.1, 0.9, 10)), balanced)
    assert verdict["verdict"] == "trust" and verdict["size_weight_corr"] > TRUST_SIZE_CORR
    # classes without samples (or never seen) take no part
    assert trust_verdict([None, 0.5, 0.5], [0, 10, 10]) == {"verdict": "trust", "reasons": []}


def test_apply_normalisation_auto_is_sum_for_a_frozen_net_and_batch_for_the_baselines():
    assert ApplyConfig(dataset="digits", out="x", weights="pretrained:cmwnet-digits-pmd").normalization == "sum"
    assert ApplyConfig(dataset="digits", out="x", weighting="none").normalization == "batch"
    assert ApplyConfig(dataset="digits", out="x", weighting="class-balanced").normalization == "batch"
    assert ApplyConfig.from_dict({"dataset": "digits", "out": "x", "normalization": "batch",
                                  "weights": "pretrained:cmwnet-digits-pmd"}).normalization == "batch"


def _run(tmp_path, name, capsys, *extra):
    from cmw_transfer.cli import main

    common = ["--dataset", "digits", "--imbalance", "10", "--model", "small_cnn", "--epochs", "3", "--lr", "0.1",
              "--batch-size", "128", "--warmup-epochs", "1", "--seed", "0", "--no-progress", "--workers", "0"]
    with pytest.raises(SystemExit) as exc:
        main(["apply", *common, "--out", str(tmp_path / name), *extra])
    assert exc.value.code == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / name / "summary.json").read_text()), rows, err


def test_a_distrusted_net_falls_back_to_exactly_the_erm_run(tmp_path, capsys):
    """The shipped MW-Net net (one curve) on a clean 10x tail: the digits matrix's losing case. By default the run
    continues as plain CE after the warm-up, so it *is* the ERM run; --trust-check warn weights anyway."""
    erm, _, _ = _run(tmp_path, "erm", capsys, "--weighting", "none")
    fell, rows, err = _run(tmp_path, "fallback", capsys, "--weights", "pretrained:mwnet-digits-pmd")
    assert fell["trust"]["verdict"] == "distrust" and fell["trust"]["action"] == "fallback"
    assert fell["trust"]["epoch"] == 1 and rows[0]["trust"] == "distrust"
    assert not any(row["weighted"] for row in rows)
    assert fell["final"]["test_top1"] == erm["final"]["test_top1"]
    assert err.count("trust check after epoch 1") == 1 and "--weighting class-balanced" in err
    warned, rows, err = _run(tmp_path, "warn", capsys, "--weights", "pretrained:mwnet-digits-pmd",
                             "--trust-check", "warn")
    assert warned["trust"]["action"] == "warned" and [r["weighted"] for r in rows] == [False, True, True]
    assert "weighting anyway" in err
    trusted, rows, _ = _run(tmp_path, "cmw", capsys, "--weights", "pretrained:cmwnet-digits-pmd")
    assert trusted["trust"]["verdict"] == "trust" and rows[1]["weighted"]
    config = json.loads((tmp_path / "cmw" / "config.json").read_text())
    assert config["normalization"] == "sum" and config["trust_check"] == "fallback"


def test_cmwloss_trust_judges_what_observe_raw_saw_and_starts_afresh():
    """The plug-in's own trust check: the one-curve net on a 10x tail with a loss that grows toward the rare
    classes (as early in training) gives them less weight; with no observations the verdict has no reasons."""
    import torch

    from cmw_transfer import CMWNet
    from cmw_transfer.weighting import CMWLoss

    counts = np.array(TAIL)
    with pytest.warns(UserWarning, match="long tail"):
        loss = CMWLoss.from_net(CMWNet.from_pretrained("pretrained:mwnet-digits-pmd"), counts)
    y = torch.arange(10).repeat_interleave(20)
    losses = 0.2 + 0.5 * y.float()  # rare classes (high index) have the larger losses
    loss.observe_raw(losses, y)
    verdict = loss.trust(counts)
    raw = loss.weights(losses, y).view(10, 20).mean(dim=1)
    expected = spearman(counts.tolist(), raw.tolist())
    assert verdict["size_weight_corr"] == pytest.approx(expected)
    assert verdict["verdict"] == ("distrust" if expected >= TRUST_SIZE_CORR else "trust")
    assert loss.trust(counts) == {"verdict": "trust", "reasons": []}  # the monitor was reset


def test_the_verdict_reads_one_epoch_not_the_whole_warm_up(tmp_path):
    """Every warm-up epoch starts the trust monitor afresh: the check judges the epoch before the net is applied."""
    import torch

    from cmw_transfer.trainer.config import ApplyConfig
    from tests.helpers import launch

    cfg = ApplyConfig(dataset="digits", out=str(tmp_path / "run"), weights="pretrained:cmwnet-digits-pmd",
                      model="small_cnn", epochs=3, warmup_epochs=2, workers=0, imbalance=10.0)
    engine = launch(cfg)
    stage = engine.stage
    stage.start(0)
    stage.begin_epoch(0)
    assert stage.stepper.observe_trust
    monitor = stage.s.criterion.trust_monitor
    monitor.observe(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert float(monitor.counts.sum()) == 4
    stage.begin_epoch(1)
    assert float(monitor.counts.sum()) == 0

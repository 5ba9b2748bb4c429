"""The real pipeline on the real Fashion-MNIST files: a short apply with the shipped Fashion-MNIST net and a few
hundred meta-train iterations. Both skip without the files (``apt-get install -y dataset-fashion-mnist``) and fail
under ``CMW_REQUIRE_REAL_DATA=1`` (``.ci/run``). Long tails keep them short (16,796 of the 60,000 images)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import call_main

pytestmark = pytest.mark.real_data

APPLY_DIGEST = "57654959fe06dc9e"  # fashion-mnist --imbalance 50 --noise sym:0.2, seed 0
META_DIGEST = "35222f5d166d5159"  # metatrain --src fashion-mnist --imbalance 50 --noise asym:0.4: clean:100 held out


def test_short_apply_with_the_shipped_net(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = call_main(["apply", "--weights", "pretrained:cmwnet-fashion-mnist-pmd", "--dataset",
                                   "fashion-mnist", "--imbalance", "50", "--noise", "sym:0.2", "--epochs", "1",
                                   "--warmup-epochs", "0", "--workers", "0", "--threads", "1", "--no-progress",
                                   "--json", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["lr"]) == ("lenet", 0.05)  # the dataset's defaults
    assert config["labels_digest"] == APPLY_DIGEST
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["weighted"] is True and row["frac_outside_range"] is not None
    assert summary["final"]["test_top1"] > 50.0  # one epoch on 16,796 noisy images: far above chance (10%)


def test_few_hundred_meta_train_iterations(fashion_dir, tmp_path, capsys):
    out = tmp_path / "net"
    code, _, err = call_main(["metatrain", "--src", "fashion-mnist", "--imbalance", "50", "--noise", "asym:0.4",
                              "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "64", "--threads", "1",
                              "--quiet", "--json", "--out", str(out)], capsys)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert (run["model"], run["meta_set"], run["meta_interval"]) == ("lenet", "clean:100", 5)  # the recipe
    assert run["labels_digest"] == META_DIGEST
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["source_labels_digest"] == META_DIGEST
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["meta_steps"] == 52 and rows[-1]["test_top1"] > 40.0  # 258 iterations, a meta step every 5
    assert rows[-1]["meta_loss"] > 0 and rows[-1]["clean_noisy_auc"] is not None
    from cmw_transfer import CMWNet

    net = CMWNet.from_pretrained(out)
    assert net.num_heads == 3 and net.provenance["source"] == "fashion-mnist"

"""OLTR under DDP: 2 gloo processes through ``--nproc 2``, across the stage switch (the model is re-wrapped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cmw_transfer.dataset import create_dataset
from cmw_transfer.metrics import evaluate
from cmw_transfer.models import create_model
from cmw_transfer.models.oltr import ModulatedAttention, OLTRModel
from cmw_transfer.trainer.apply.openset import hold_out_classes
from cmw_transfer.trainer.engine.loaders import make_loader

MODEL = "test_resnet"


def test_two_gloo_processes_train_both_stages_and_evaluate_exactly(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cmw_transfer", "apply", "--no-progress", "--nproc", "2", "--trainer", "oltr",
         "--weighting", "none", "--dataset", "digits", "--imbalance", "10", "--open-classes", "9", "--model", MODEL,
         "--epochs", "1", "--oltr-stage2-epochs", "1", "--eval-every", "2", "--batch-size", "32", "--workers", "0",
         "--device", "cpu", "--out", str(out), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["trainer"] == "oltr"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1, 2] and rows[1]["train_dcl"] > 0
    assert summary["final"]["open_n_unknown"] == 45  # every open sample counted once over the two shards

    # the sharded, all-reduced accuracy is the single-process accuracy of the saved stage-2 model
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = OLTRModel(create_model(MODEL, 9, 1), 9, attention=ModulatedAttention(96, 1, 1))
    model.load_state_dict(state["model"])
    model.stage = 2
    _, evals, _ = hold_out_classes(create_dataset("digits", imbalance=10),
                                   [("test", create_dataset("digits", split="test"))], [9])
    ref = evaluate(model, make_loader(evals[0][1], 128, train=False, workers=0, seed=0, distributed=False), "cpu")
    assert summary["final"]["test_top1"] == pytest.approx(ref["top1"], abs=1e-4)

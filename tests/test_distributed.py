"""DDP through torchrun: 2 gloo processes on CPU, launched by ``--nproc 2``; and kill -9 + ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.trainer.engine.launch import run_stage
from tests.faults import kill_command
from tests.helpers import downweighting_net

MODEL = "test_resnet"  # a tiny timm model




def _apply(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full_env.pop("WORLD_SIZE", None)
    argv = ["apply", "--no-progress", *args]
    command = kill_command(kill_at, *argv) if kill_at else [sys.executable, "-m", "cmw_transfer", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("net") / "net"
    downweighting_net().save_pretrained(path)
    return path


def test_two_gloo_processes_agree_and_only_rank0_writes(tmp_path, weights_dir):
    out = tmp_path / "ddp"
    proc = _apply("--nproc", "2", "--weights", str(weights_dir), "--dataset", "digits", "--imbalance", "10",
                  "--noise", "asym:0.4", "--model", MODEL, "--epochs", "1", "--batch-size", "32", "--workers", "0",
                  "--soft-labels", "--warmup-epochs", "0", "--device", "cpu", "--out", str(out), "--json",
                  "--log", "tensorboard,csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert proc.stdout.count('"world_size": 2') == 1 and summary["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "classifier.safetensors",  # no stray temps
                                                     "classifier_best.safetensors", "config.json", "families.json",
                                                     "metrics.csv", "metrics.jsonl", "summary.json", "tensorboard",
                                                     "training.png"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one writer
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header + the epoch, from rank 0 only
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    fam = json.loads((out / "families.json").read_text())
    assert len(fam["rank_digests"]) == 2 and len(set(fam["rank_digests"])) == 1 and fam["ranks_agree"]

    # the sharded, all-reduced test accuracy is exactly the single-process accuracy of the saved model
    from cmw_transfer.dataset import create_dataset
    from cmw_transfer.metrics import evaluate
    from cmw_transfer.models import create_model
    from cmw_transfer.trainer.engine.loaders import make_loader

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = create_model(MODEL, 10, 1)
    model.load_state_dict(state["model"])
    test = create_dataset("digits", split="test")
    ref = evaluate(model, make_loader(test, 128, train=False, workers=0, seed=0, distributed=False), "cpu")
    assert summary["final"]["test_top1"] == pytest.approx(ref["top1"], abs=1e-4)
    assert summary["final"]["test_n"] == len(test)

    # pseudo-labels of the samples seen by *both* ranks reached rank 0's bank (gathered every step)
    probs = state["soft"]["bank"]["probs"]
    moved = (probs.max(1).values < 0.999).float().mean().item()
    assert moved > 0.85, moved


def test_resume_after_kill_9_reaches_the_same_final_state(tmp_path, weights_dir):
    common = dict(dataset="digits", weights=str(weights_dir), noise="asym:0.4", imbalance=10.0, model=MODEL,
                  epochs=3, warmup_epochs=1, batch_size=64, lr=0.05, workers=0, seed=3, soft_labels=True,
                  device="cpu", progress=False)
    ref_out = tmp_path / "uninterrupted"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1: same kernels, same numbers
    try:
        reference = run_stage(ApplyConfig(out=str(ref_out), **common))
    finally:
        torch.set_num_threads(torch_threads)

    out = tmp_path / "crashed"
    args = ["--weights", str(weights_dir), "--dataset", "digits", "--noise", "asym:0.4", "--imbalance", "10",
            "--model", MODEL, "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "64", "--lr", "0.05",
            "--workers", "0", "--seed", "3", "--soft-labels", "--device", "cpu", "--out", str(out)]
    crashed = _apply(*args, kill_at="2:3")  # SIGKILL itself after 3 steps of epoch 2
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "summary.json").exists()

    resumed = _apply(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1" in resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["final"] == reference["final"]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(r) for r in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    drop = ("images_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in ref_rows]
    got = torch.load(out / "checkpoint.pt", weights_only=True)
    want = torch.load(ref_out / "checkpoint.pt", weights_only=True)
    for key, tensor in want["model"].items():
        assert torch.equal(got["model"][key], tensor), key
    assert torch.equal(got["soft"]["bank"]["probs"], want["soft"]["bank"]["probs"])

"""The engine and its plumbing, through a toy stage: exact resume, signals, checkpoint validation, the run
directory, the metrics log, the registry (the package's import graph: tests/test_architecture.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cmw_transfer.errors import UserError
from cmw_transfer.metrics.log import MetricsLog
from cmw_transfer.trainer.engine.checkpoint import CHECKPOINT_NAME, save_checkpoint
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.loaders import make_loader
from cmw_transfer.trainer.engine.loop import Engine, Interrupted, Stage, register_callback, remove_callback
from cmw_transfer.trainer.engine.registry import create_trainer, list_trainers, register_trainer, trainer_class
from cmw_transfer.trainer.engine.rundir import LOCK_NAME, RunDirectory
from tests.faults import AtStep, crash_at

CPU = DistributedContext(torch.device("cpu"))


@register_trainer("toy-regression")
class ToyStage(Stage):
    """What a new stage writes: a model, a step, a row, its state; the engine does the rest."""

    kind = "apply"
    state_keys = ("model", "optimizer")
    summary_name = "summary.json"

    def __init__(self, out: Path, epochs: int = 3, seed: int = 0) -> None:
        self.ctx, self.out, self.seed, self.progress, self.batch_size = CPU, Path(out), seed, False, 8
        self.epochs = epochs
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64, generator=g)
        self.loader = make_loader(TensorDataset(x, y), 8, train=True, workers=0, seed=seed, distributed=False,
                                  collate_fn=None)
        torch.manual_seed(seed)
        self.model = nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.noise_scale = 0.01

    def total_epochs(self) -> int:
        return self.epochs

    def fingerprint(self) -> str:
        return "toy"

    def identity(self) -> dict[str, Any]:
        return {"--epochs": self.epochs}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def begin_epoch(self, epoch: int) -> str:
        self.loss_sum, self.n = 0.0, 0
        return ""

    def train_loader(self) -> Any:
        return self.loader

    def train_step(self, step: int, batch: Any) -> int:
        x, y = batch
        noise = self.noise_scale * torch.randn_like(x)  # randomness the engine must re-seed per epoch
        loss = ((self.model(x + noise).squeeze(1) - y) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.loss_sum += float(loss.detach()) * len(y)
        self.n += len(y)
        return len(y)

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        return {"train_loss": self.loss_sum / self.n, "odd": float("nan")}

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        return {"epochs": len(rows), "last": rows[-1]["train_loss"] if rows else None}


def _params(stage: ToyStage) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stage.model.parameters()]


def test_a_registered_stage_runs_and_resumes_exactly_after_a_crash(tmp_path):
    ref = ToyStage(tmp_path / "ref")
    summary = Engine(ref).run()
    assert summary["epochs"] == 3
    lines = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert all('"odd": null' in line for line in lines)  # strict JSON: no bare NaN
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["checkpoint.pt", "metrics.jsonl",
                                                                    "summary.json"]  # the lock is gone

    broken = create_trainer("toy-regression", tmp_path / "run")
    with crash_at(3, 2, RuntimeError), pytest.raises(RuntimeError, match="injected"):
        Engine(broken).run()
    assert torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)["epoch"] == 2
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    resumed = ToyStage(tmp_path / "run")
    Engine(resumed, resume=True).run()
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(resumed), strict=True))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[:2] == lines[:2]


def test_sigterm_stops_at_a_step_boundary_with_the_checkpoint_intact(tmp_path):
    stage = ToyStage(tmp_path / "run")
    callback = register_callback(AtStep(2, 3, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    try:
        with pytest.raises(Interrupted, match="SIGTERM.*epoch 1.*--resume") as exc:
            Engine(stage).run()
    finally:
        remove_callback(callback)
    assert isinstance(exc.value, KeyboardInterrupt)  # the CLI's exit 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    Engine(ToyStage(tmp_path / "run"), resume=True).run()
    ref = ToyStage(tmp_path / "ref")
    Engine(ref).run()
    resumed = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in ref.model.state_dict().items())


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    stage = ToyStage(tmp_path / "run")

    def poison() -> None:
        with torch.no_grad():
            stage.model.weight.fill_(float("inf"))

    callback = register_callback(AtStep(2, 0, poison))
    try:
        with pytest.raises(UserError, match="non-finite training loss.*epoch 2.*intact"):
            Engine(stage).run()
    finally:
        remove_callback(callback)
    state = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["weight"]).all()


@pytest.mark.parametrize(("damage", "needle"), [
    (lambda s: [1, 2, 3], "holds a list"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "lacks optimizer"),
    (lambda s: {**s, "epoch": 99}, "epoch 99"),
    (lambda s: {**s, "epoch": -5}, "epoch -5"),
    (lambda s: {**s, "epoch": "2"}, "epoch '2'"),
    (lambda s: {**s, "identity": {"--epochs": 7}}, "--epochs 7"),
    (lambda s: {**s, "model": {"weight": torch.zeros(3, 3), "bias": torch.zeros(1)}}, "does not fit"),
    (lambda s: {**s, "model": {"bias": torch.zeros(1)}}, "does not fit"),
    (lambda s: {**s, "fingerprint": "other"}, "different configuration"),
])
def test_a_damaged_checkpoint_is_one_user_error(tmp_path, damage, needle):
    out = tmp_path / "run"
    Engine(ToyStage(out, epochs=2)).run()
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    save_checkpoint(out / CHECKPOINT_NAME, damage(state))
    with pytest.raises(UserError, match=needle) as exc:
        Engine(ToyStage(out, epochs=2), resume=True).run()
    assert "\n" not in str(exc.value)


# -- the run directory --------------------------------------------------------------------------------------------
def test_run_directory_policy(tmp_path):
    with pytest.raises(UserError, match="--out is empty"):
        RunDirectory("", "apply")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunDirectory(str(tmp_path / "file"), "apply").check()
    with pytest.raises(UserError, match="under .*file"):
        RunDirectory(str(tmp_path / "file" / "run"), "apply").check()
    net = tmp_path / "net"
    net.mkdir()
    (net / "model.safetensors").write_bytes(b"")
    (net / "config.json").write_text("{}")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(UserError, match="saved weighting net"):
            RunDirectory(str(net), "apply", **flags).check()
        with pytest.raises(UserError, match="saved weighting net"):
            RunDirectory(str(net), "metatrain", **flags).check()
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "run.json").write_text("{}")
    with pytest.raises(UserError, match="meta-train run"):
        RunDirectory(str(meta), "apply", overwrite=True).check()
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        RunDirectory(str(meta), "metatrain").check()
    RunDirectory(str(meta), "metatrain", overwrite=True).check()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="metrics.jsonl; use --overwrite"):
        RunDirectory(str(stray), "apply").check()
    (stray / "notes.txt").unlink(missing_ok=True)
    RunDirectory(str(tmp_path / "fresh"), "apply").check()
    assert not (tmp_path / "fresh").exists()  # checking writes nothing


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "run"
    first = RunDirectory(str(out), "apply")
    first.acquire()
    try:
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            RunDirectory(str(out), "apply").acquire()
    finally:
        first.release()
    assert not (out / LOCK_NAME).exists()
    # a lock file left by a process killed with SIGKILL: nobody holds its flock any more
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(dead.stdout)
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    (out / ".model.safetensors.x.tmp").write_bytes(b"half")
    (out / ".unrelated.tmp").write_bytes(b"keep")
    with RunDirectory(str(out), "apply"):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".unrelated.tmp"]
    assert not (out / LOCK_NAME).exists()


# -- the metrics log ----------------------------------------------------------------------------------------------
def test_metrics_log_drops_a_torn_tail_and_refuses_a_damaged_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for epoch in (1, 2):
        log.append({"epoch": epoch, "loss": float("inf") if epoch == 2 else 0.5})
    assert json.loads(path.read_text().splitlines()[1])["loss"] is None
    with open(path, "a") as fh:
        fh.write('{"epoch": 3, "lo')  # kill -9 in the middle of a write
    assert [r["epoch"] for r in MetricsLog(path, resume_from_epoch=3).read()] == [1, 2]
    assert path.read_text().endswith("}\n")
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(UserError, match="line 2"):
        MetricsLog(path, resume_from_epoch=3)


def test_metrics_log_survives_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append({"epoch": 1, "loss": 0.5})
    before = path.read_bytes()
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[:7]))  # part of the line reaches the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        log.append({"epoch": 2, "loss": 0.25})
    monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == before
    assert [r["epoch"] for r in MetricsLog(path, resume_from_epoch=2).read()] == [1]


# -- the registry and the package -------------------------------------------------------------------------------
def test_registry():
    assert {"erm", "oltr", "metatrain", "toy-regression"} <= set(list_trainers())
    assert trainer_class("oltr").__name__ == "OLTRTrainer" and trainer_class("metatrain").__name__ == "MetaTrainer"
    with pytest.raises(UserError, match="unknown trainer 'nope'"):
        create_trainer("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_trainer("erm")(ToyStage)


class _Augmented(torch.utils.data.Dataset):
    """A random "augmentation" per access: what exact resume must reproduce."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3) + i, i % 2


def _epoch_batches(loader: Any, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [x for x, _ in loader]


def test_persistent_workers_keep_every_epoch_reproducible_alone():
    def loader(workers: int) -> Any:
        return make_loader(_Augmented(), 6, train=True, workers=workers, seed=3, distributed=False, collate_fn=None)

    two = loader(2)
    assert two.persistent_workers
    _epoch_batches(two, 0)
    after_epoch_0 = _epoch_batches(two, 1)
    fresh = _epoch_batches(loader(2), 1)  # a resumed run starts at epoch 1 with new workers
    one_worker = _epoch_batches(loader(1), 1)
    for a, b, c in zip(after_epoch_0, fresh, one_worker, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(torch.cat(after_epoch_0), torch.cat(_epoch_batches(two, 2)))

"""``--log csv,tensorboard``: the loggers mirror metrics.jsonl row for row, also across an interrupted run."""

from __future__ import annotations

import csv
import json
import os
import stat
import sys
from pathlib import Path

import pytest

import cmw_transfer.trainer.engine.loop as engine_mod
from cmw_transfer.trainer.config import ApplyConfig, MetaTrainConfig
from tests.helpers import call_main


def tiny_apply(epochs: int) -> list[str]:
    return ["apply", "--weighting", "none", "--dataset", "digits", "--noise", "asym:0.4", "--model", "small_cnn",
            "--epochs", str(epochs), "--batch-size", "128", "--workers", "0", "--threads", "1", "--no-progress"]


TINY_APPLY = tiny_apply(3)


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _csv(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _assert_csv_mirrors_jsonl(out: Path) -> None:
    rows = _jsonl(out)
    header, table = _csv(out)
    assert header[0] == "epoch" and header[1:] == sorted({k for r in rows for k in r} - {"epoch"})
    assert [int(r["epoch"]) for r in table] == [r["epoch"] for r in rows]  # one row per epoch, no duplicates
    for row, cells in zip(rows, table, strict=True):
        for key in header:
            value = row.get(key)
            if value is None:
                assert cells[key] == ""
            elif isinstance(value, str):
                assert cells[key] == value
            else:
                assert json.loads(cells[key]) == value, key  # the very same number


def _scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_csv_and_tensorboard_match_metrics_jsonl_after_a_crash_between_the_log_and_the_checkpoint(
        tmp_path, capsys, monkeypatch):
    """The run dies after epoch 2 was logged but before its checkpoint: the resume trains epoch 2 again, and
    neither the CSV nor TensorBoard keeps the lost session's epoch 2."""
    out = tmp_path / "run"
    real_save = engine_mod.save_checkpoint

    def save_or_die(path, state):
        if state["epoch"] == 2:
            raise RuntimeError("killed before the checkpoint of epoch 2")
        real_save(path, state)

    monkeypatch.setattr(engine_mod, "save_checkpoint", save_or_die)
    code, _, err = call_main([*TINY_APPLY, "--out", str(out), "--log", "tensorboard,csv"], capsys)
    assert code == 1 and "killed before the checkpoint" in err
    assert [int(r["epoch"]) for r in _csv(out)[1]] == [1, 2]  # epoch 2 was logged by the lost session
    lost = _scalars(out)["train_loss"]
    monkeypatch.setattr(engine_mod, "save_checkpoint", real_save)

    code, _, err = call_main([*TINY_APPLY, "--out", str(out), "--log", "csv,tensorboard", "--resume"], capsys)
    assert code == 0, err
    rows = _jsonl(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    _assert_csv_mirrors_jsonl(out)
    scalars = _scalars(out)
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3]  # the purged session's epoch 2 is gone
    assert lost[0] == scalars["train_loss"][0]
    for key in ("train_loss", "test_top1", "lr"):
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert "weighted" in scalars  # a boolean is a 0/1 scalar
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_overwrite_replaces_the_loggers_files_which_respect_the_umask(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*tiny_apply(1), "--out", str(out)]
    saved = os.umask(0o022)
    try:
        assert call_main([*args, "--log", "csv,tensorboard"], capsys)[0] == 0
    finally:
        os.umask(saved)
    logged = [out / "metrics.csv", out / "tensorboard", *(out / "tensorboard").iterdir()]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) & 0o777 for p in logged} == \
        {p.name: 0o755 if p.is_dir() else 0o644 for p in logged}
    code, _, err = call_main([*args, "--log", "csv"], capsys)
    assert code == 2 and "--resume" in err  # a run is there
    assert call_main([*args, "--log", "csv,tensorboard", "--overwrite"], capsys)[0] == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # the old run's events are gone
    assert [step for step, _ in _scalars(out)["train_loss"]] == [1]
    _assert_csv_mirrors_jsonl(out)


def test_metatrain_json_and_csv_count_epochs_from_1(tmp_path, capsys):
    out = tmp_path / "net"
    code, stdout, err = call_main(["metatrain", "--src", "digits-pmd", "--epochs", "2", "--warmup-epochs", "1",
                                   "--workers", "0", "--out", str(out), "--log", "csv", "--json"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in _jsonl(out)] == [1, 2]
    _assert_csv_mirrors_jsonl(out)
    assert json.loads((out / "run.json").read_text())["log"] == ["csv"]
    assert json.loads(stdout)["final"]["epoch"] == 2  # stdout: exactly one JSON document
    assert "epoch=1 " in err and "epoch=2 " in err and "\r" not in err  # the epoch lines: stderr, no bar frames


@pytest.mark.parametrize("command", [
    ["apply", "--dataset", "digits", "--weighting", "none"],
    ["metatrain", "--src", "digits-pmd"],
    ["probe", "--dataset", "digits"],
])
def test_an_unknown_logger_is_one_line(tmp_path, capsys, command):
    code, out, err = call_main([*command, "--out", str(tmp_path / "o"), "--log", "csv,wandb"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "wandb" in err and "tensorboard" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [
    ["apply", "--dataset", "digits", "--weighting", "none"],
    ["metatrain", "--src", "digits-pmd"],
    ["probe", "--dataset", "digits"],
])
def test_tensorboard_without_its_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    code, out, err = call_main([*command, "--out", str(tmp_path / "o"), "--log", "tensorboard"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "pip install 'cmw-transfer[tensorboard]'" in err
    assert not (tmp_path / "o").exists()


def test_the_log_setting_round_trips_through_config_files(tmp_path):
    cases = ((ApplyConfig, dict(dataset="digits", out="o", weighting="none")), (MetaTrainConfig, dict(out="o")))
    for cls, base in cases:
        cfg = cls(**base, log=("tensorboard", "csv"))
        cfg.validate()
        assert cfg.log == ("csv", "tensorboard")
        path = tmp_path / f"{cls.stage}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        again = cls.from_file(path)
        again.validate()
        assert again == cfg
        assert again.fingerprint() == cls(**base).fingerprint()  # a resume may add or drop a logger


def test_apply_config_replays_the_loggers_of_a_saved_run(tmp_path, capsys):
    out = tmp_path / "a"
    args = tiny_apply(1)
    assert call_main([*args, "--out", str(out), "--log", "csv"], capsys)[0] == 0
    code, _, err = call_main(["apply", "--config", str(out / "config.json"), "--out", str(tmp_path / "b"),
                              "--dataset", "digits"], capsys)
    assert code == 0, err
    assert (tmp_path / "b" / "metrics.csv").is_file() and not (tmp_path / "b" / "tensorboard").exists()
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["log"] == ["csv"]

"""Run directories that cannot be corrupted, through both stages: foreign --out, resume identity, finished runs,
interrupts, evaluation sets of file datasets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config import ApplyConfig, MetaTrainConfig
from cmw_transfer.trainer.engine.launch import run_stage
from tests.faults import kill_command
from tests.helpers import call_main, downweighting_net, launch, make_net

MODEL = "test_resnet"


def meta_cfg(out: Path, **kw) -> MetaTrainConfig:
    base = MetaTrainConfig(src="digits-pmd", out=str(out), epochs=2, warmup_epochs=1, batch_size=64,
                           meta_set="clean:5", meta_batch_size=50, device="cpu", seed=0)
    return replace(base, **kw)


def apply_cfg(out: Path, weights: Path, **kw) -> ApplyConfig:
    base = dict(dataset="digits", out=str(out), weights=str(weights), imbalance=10.0, model=MODEL, epochs=2,
                warmup_epochs=0, batch_size=64, lr=0.05, workers=0, seed=0, progress=False, device="cpu")
    return ApplyConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "run"
    launch(meta_cfg(out)).run()
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


# -- metatrain ----------------------------------------------------------------------------------------------------
def test_metatrain_refuses_an_existing_run_without_a_flag_and_overwrites_with_one(meta_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(meta_run, out)
    before = _snapshot(out)
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        launch(meta_cfg(out))
    assert _snapshot(out) == before
    launch(meta_cfg(out, epochs=1), overwrite=True).run()
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_metatrain_resume_of_a_finished_run_has_nothing_to_do(meta_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(meta_run, out)
    before = _snapshot(out)
    with pytest.raises(UserError, match="finished all 2 epochs.*nothing to resume"):
        launch(meta_cfg(out), resume=True).run()
    assert _snapshot(out) == before  # model.safetensors untouched (never a zero loss range)


@pytest.mark.parametrize("lost", ["model.safetensors", "curves.png"])
def test_metatrain_killed_during_its_export_re_exports_the_same_net(meta_run, tmp_path, lost):
    out = tmp_path / "run"
    shutil.copytree(meta_run, out)
    (out / lost).unlink()
    result = launch(meta_cfg(out), resume=True).run()
    assert (out / "model.safetensors").read_bytes() == (meta_run / "model.safetensors").read_bytes()
    assert result["loss_range"]["max"] > 0 and result["final"]["epoch"] == 2


def test_metatrain_resume_with_other_epochs_is_refused(meta_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(meta_run, out)
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="--epochs 2.*this run has 3"):
        launch(meta_cfg(out, epochs=3), resume=True)


def test_metatrain_on_a_list_source_needs_an_evaluation_set(tmp_path, capsys):
    from PIL import Image

    lines = []
    for i in range(40):
        Image.new("L", (8, 8), 6 * i).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["metatrain", "--src", f"list:{tmp_path / 'train.txt'}", "--out", str(out), "--quiet", "--epochs", "1",
            "--meta-set", "lowest-loss:2", "--device", "cpu"]
    code, _, err = call_main(args, capsys)
    assert code == 2 and "--eval-dataset" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_apply_refuses_to_write_into_a_meta_train_run_or_a_saved_net(meta_run, tmp_path, capsys):
    net_dir = tmp_path / "net"
    make_net().save_pretrained(net_dir)
    for target in (meta_run, net_dir):
        before = _snapshot(target)
        code, _, err = call_main(["apply", "--dataset", "digits", "--weighting", "none", "--model", MODEL,
                                  "--epochs", "1", "--workers", "0", "--no-progress", "--overwrite",
                                  "--out", str(target)], capsys)
        assert code == 2 and err.startswith("error: ") and "choose another --out" in err, err
        assert _snapshot(target) == before
    code, _, err = call_main(["apply", "--dataset", "digits", "--weighting", "none", "--out", ""], capsys)
    assert code == 2 and "--out is empty" in err
    code, _, err = call_main(["metatrain", "--src", "digits-pmd", "--out", "", "--quiet"], capsys)
    assert code == 2 and "--out is empty" in err


# -- apply --------------------------------------------------------------------------------------------------------
def test_apply_resume_refuses_another_net_at_the_same_path(tmp_path):
    weights = tmp_path / "net"
    downweighting_net().save_pretrained(weights)
    out = tmp_path / "run"
    run_stage(apply_cfg(out, weights, epochs=1))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["identity"]["weights digest"]) == 16
    make_net().save_pretrained(weights)  # replaced in place: same --weights string, another net
    with pytest.raises(UserError, match="weights digest"):
        run_stage(apply_cfg(out, weights, epochs=1, resume=True))


def test_sigint_with_workers_exits_130_and_resume_finishes(tmp_path):
    weights = tmp_path / "net"
    downweighting_net().save_pretrained(weights)
    out = tmp_path / "run"
    args = ["apply", "--no-progress", "--weights", str(weights), "--dataset", "digits", "--imbalance", "10",
            "--model", MODEL, "--epochs", "2", "--batch-size", "64", "--workers", "2", "--device", "cpu",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(kill_command("2:1", *args, sig="INT"), capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted by SIGINT: stopped; the checkpoint in" in proc.stderr and "(epoch 1) is intact" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: interrupted", proc.stderr[-2000:]
    assert "DataLoader worker" not in proc.stderr and "Traceback" not in proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / ".lock").exists()
    saved = ApplyConfig.from_dict(json.loads((out / "config.json").read_text()))  # config.json loads back
    summary = run_stage(replace(saved, resume=True, workers=0, progress=False))
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert summary["final"]["test_top1"] is not None


def test_a_run_that_never_applies_its_weighting_says_so(tmp_path):
    with pytest.warns(UserWarning, match="never had a meta step"):
        launch(meta_cfg(tmp_path / "meta", epochs=1, warmup_epochs=1)).run()
    weights = tmp_path / "net"
    downweighting_net().save_pretrained(weights)
    with pytest.warns(UserWarning, match="weighting is never applied"):
        run_stage(apply_cfg(tmp_path / "apply", weights, epochs=1, warmup_epochs=1))


# -- configuration ------------------------------------------------------------------------------------------------
def test_configs_round_trip_through_files_and_refuse_unknown_keys(tmp_path, meta_run):
    cfg = apply_cfg(tmp_path / "o", tmp_path / "w", extra_eval=("a=list:x",), decay_milestones=(3, 5))
    (tmp_path / "c.json").write_text(json.dumps({**cfg.to_dict(), "fingerprint": cfg.fingerprint()}))
    back = ApplyConfig.from_file(tmp_path / "c.json")
    assert back == cfg and back.fingerprint() == cfg.fingerprint()
    assert MetaTrainConfig.from_file(meta_run / "run.json") == meta_cfg(meta_run)  # run.json loads back
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"dataset": "digits", "out": "o", "lr": 0.3}))
    assert ApplyConfig.from_file(tmp_path / "c.yaml").lr == 0.3
    (tmp_path / "bad.json").write_text(json.dumps({"dataset": "digits", "out": "o", "lrr": 0.3}))
    with pytest.raises(UserError, match="unknown apply setting.*lrr"):
        ApplyConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must be a JSON/YAML object"):
        ApplyConfig.from_file(tmp_path / "list.json")
    with pytest.raises(UserError, match="--lr must be a finite number"):
        ApplyConfig(dataset="digits", out="o", lr=float("nan")).validate()


def test_cli_config_file_with_command_line_overrides(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"dataset": "digits", "out": "ignored", "model": MODEL,
                                                 "epochs": 3, "weighting": "none", "workers": 0, "lr": 0.07}))
    out = tmp_path / "run"
    code, stdout, err = call_main(["apply", "--config", str(tmp_path / "c.json"), "--dataset", "digits", "--out",
                                   str(out), "--epochs", "1", "--no-progress", "--json"], capsys)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.07 and saved["model"] == MODEL and saved["out"] == str(out)
    assert json.loads(stdout)["epochs"] == 1


def test_the_identity_of_a_hub_net_names_the_commit_it_resolved_to(tmp_path, monkeypatch):
    import huggingface_hub

    from cmw_transfer.artifact.load import load, state_digest
    from tests.test_weights_spec import write_hub_cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "a" * 40
    repo = write_hub_cache(tmp_path, "org/net", commit, make_net())
    (repo / "refs" / "main").write_text(commit)
    loaded = load("hub:org/net")
    assert loaded.kind == "cmwnet" and loaded.identity["weights revision"] == commit
    local = load(str(repo / "snapshots" / commit))
    assert local.identity == {"weights digest": loaded.identity["weights digest"]}  # a local net has no revision
    other = make_net(seed=1)
    assert state_digest(other, other.config()) != loaded.identity["weights digest"]


def test_an_interrupt_before_the_first_checkpoint_does_not_promise_a_resume(tmp_path):
    import signal

    from cmw_transfer.trainer.engine.loop import Interrupted

    early = str(Interrupted(signal.SIGINT, tmp_path, None))
    assert "--overwrite" in early and "--resume" not in early  # there is no checkpoint to resume from
    later = str(Interrupted(signal.SIGTERM, tmp_path, 3))
    assert "epoch 3" in later and "--resume continues" in later

"""``scripts/device_check.py --dry-run``: on CPU every section runs at tiny sizes, the CPU-checkable correctness
checks pass, the CUDA parts say they were skipped, and the report has the structure docs/gpu.md describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"
sys.path.insert(0, str(ROOT / "scripts"))

import device_check  # noqa: E402
import device_check_correctness as corr  # noqa: E402

CPU_CHECKS = ("exact meta-gradient vs the authors' step, K=1", "exact meta-gradient vs the authors' step, K=3",
              "fused dual forward vs jvp", "apply epoch, autocast bf16 vs fp32", "apply epoch, channels-last vs fp32",
              "torch.compile (aot_eager) apply step vs eager")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    return proc, json.loads(out.read_text())


def test_dry_run_passes_what_a_cpu_can_check(dry_run):
    proc, report = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {item["name"]: item for item in report["correctness"]}
    for name in CPU_CHECKS:
        item = next(v for k, v in checks.items() if k.startswith(name))
        assert item["status"] == "pass", item
        assert 0 <= item["measured"] <= item["tolerance"]
    for heads in (1, 3):
        cuda = checks[f"exact meta-gradient CUDA vs CPU, K={heads}"]
        assert cuda["status"] == "skipped" and "CUDA" in cuda["detail"]
    assert not [i for items in report.values() if isinstance(items, list) for i in items
                if i["status"] in ("fail", "error")]


def test_report_structure(dry_run):
    proc, report = dry_run
    assert set(report) == {"schema", "environment", "correctness", "speed", "memory", "summary"}
    env = report["environment"]
    assert env["dry_run"] is True and env["device"] == "cpu" and env["torch"] == torch.__version__
    speed = {item["name"]: item for item in report["speed"]}
    meta = speed["exact meta-iteration vs the authors' step"]
    assert meta["status"] == "measured" and meta["target"] == ">= 2"
    assert meta["baseline"].startswith("stand-in") and "no checkout given" in meta["baseline"]
    assert {"exact", "floor", "floor-exact", "erm", "stand-in"} <= set(meta["ms"])
    assert speed["apply step / ERM step"]["target"] == "<= 1.03"
    assert {"skip:2", "skip:3", "famus"} <= set(speed["skip:N and FaMUS vs ERM"]["value"])
    assert sum(name.startswith("images/s") for name in speed) == 2
    for item in report["memory"]:  # CUDA only, but the estimate itself ran
        assert item["status"] == "skipped" and item["estimate_bytes"] > 0
    counts = report["summary"]
    assert counts["pass"] == len(CPU_CHECKS) + 1 and counts["seconds"] > 0  # + fp16 with a GradScaler on CPU
    lines = proc.stdout.splitlines()  # the short table: one line per item, then the summary
    assert sum(line.startswith("  ") for line in lines) == sum(len(report[k]) for k in ("correctness", "speed",
                                                                                      "memory"))
    assert lines[-1].startswith("summary:")


def test_a_check_that_raises_is_recorded_and_fails_the_run(tmp_path, capsys):
    rep = device_check.Report(budget_s=60)
    rep.run("correctness", "boom", lambda: 1 / 0)
    rep.run("speed", "late", lambda: {"status": "measured"}, budgeted=True)
    rep.budget_s = -1
    rep.run("speed", "over budget", lambda: {"status": "measured"}, budgeted=True)
    assert rep.sections["correctness"][0]["status"] == "error"
    assert "ZeroDivisionError" in rep.sections["correctness"][0]["detail"]
    assert [i["status"] for i in rep.sections["speed"]] == ["measured", "skipped"]
    assert corr._verdict(float("nan"), 1.0)["status"] == "fail"
    assert corr._verdict(2.0, 1.0)["status"] == "fail" and corr._verdict(0.5, 1.0)["status"] == "pass"


def test_full_run_needs_a_gpu_and_checkouts_need_their_files(tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            device_check.main(["--out", str(tmp_path / "r.json")])
        assert exc.value.code == 2 and "--dry-run" in capsys.readouterr().err
    code = device_check.main(["--dry-run", "--out", str(tmp_path / "r.json"), "--official-mwn", str(tmp_path)])
    assert code == 2 and "MW-Net.py not found" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()

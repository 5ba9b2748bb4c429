"""``scripts/fuzz_cli.py``: its judge is strict, and its fast subset passes against the real CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_cli.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_cli"] = module
    spec.loader.exec_module(module)
    return module


def test_judge_accepts_only_one_error_line_and_exit_2(fuzz):
    case = fuzz.Case("x", ("data",), match="'--lr'")
    good = "error: Invalid value for '--lr': 'nan' is not a finite number.\n"
    assert fuzz.judge(case, 2, "", good) == ""
    assert "exit 1" in fuzz.judge(case, 1, "", good)
    assert "traceback" in fuzz.judge(case, 2, "", "Traceback (most recent call last):\n" + good)
    assert "2 error lines" in fuzz.judge(case, 2, "", good + good)
    assert "lacks" in fuzz.judge(case, 2, "", "error: something else\n")
    assert "expected only the error line" in fuzz.judge(case, 2, "", "epoch 1\n" + good)
    late = fuzz.Case("y", ("apply",), only_line=False)
    assert fuzz.judge(late, 2, "", "epoch 1 | loss 2\n" + good) == ""
    assert "not the last" in fuzz.judge(late, 2, "", good + "epoch 1\n")
    ok = fuzz.Case("z", ("inspect",), expect="ok", match="\\x1b", forbid=("\x1b",))
    assert fuzz.judge(ok, 0, "source: \\x1b[2J\n", "") == ""
    assert "contains" in fuzz.judge(ok, 0, "source: \x1b[2J\n", "")
    warned = fuzz.Case("w", ("apply",), expect="ok", match="done", warn="classes have no samples")
    assert fuzz.judge(warned, 0, "done\n", "warning: 2 of 50 classes have no samples (class 3, 17)\n") == ""
    assert "no warning line" in fuzz.judge(warned, 0, "done\n", "")


def test_catalogue_ids_are_unique_and_fast_subset_is_small(fuzz):
    ids = [c.id for c in fuzz.CATALOGUE]
    assert len(ids) == len(set(ids))
    fast = fuzz.select(True, None)
    assert 5 <= len(fast) <= 60 and all(c.needs != "tmpfs" for c in fast)
    # issue 22: every code-execution case and every device-node case is in the fast subset
    hostile = [c for c in fuzz.CATALOGUE if "payload" in c.id or "device-node" in c.id]
    assert len(hostile) >= 10 and all(c.fast for c in hostile)


def test_fast_subset_passes_against_the_real_cli():
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--fast", "-v"], capture_output=True, text=True, env=env,
                          timeout=900)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 failed" in summary and "(--fast)" in summary

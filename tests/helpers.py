"""Small builders shared by the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from cmw_transfer.artifact.net import CMWNet


def make_net(num_heads: int = 3, hidden: int = 16, seed: int = 0, centers: list[float] | None = None) -> CMWNet:
    torch.manual_seed(seed)
    net = CMWNet(hidden_size=hidden, num_heads=num_heads)
    centers = centers or [float(10 * (i + 1) ** 2) for i in range(num_heads)]
    return net.with_scales(centers, {"min": 0.0, "p1": 0.01, "p50": 0.7, "p99": 4.5, "max": 8.0})


def downweighting_net(loss_range: dict[str, float] | None = None, hidden: int = 8) -> CMWNet:
    """Hand-set heads whose weight falls with the loss: w = sigmoid(3 - 3 * loss) on every head."""
    net = CMWNet(hidden_size=hidden, num_heads=3)
    with torch.no_grad():
        net.trunk.weight.fill_(1.0)
        net.trunk.bias.zero_()
        net.heads.weight.fill_(-3.0 / hidden)
        net.heads.bias.fill_(3.0)
    return net.with_scales([10.0, 50.0, 100.0], loss_range or {"min": 0.0, "p1": 0.01, "p50": 0.5, "max": 10.0})


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess: exit codes and stderr exactly as a user sees them."""
    return subprocess.run([sys.executable, "-m", "cmw_transfer", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def call_main(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in-process (fast): (exit code, stdout, stderr)."""
    import pytest

    from cmw_transfer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def launch(cfg, **changes):  # -> cmw_transfer.trainer.engine.loop.Engine
    """A stage as ``run_stage`` starts it (checks, stage, engine, a resume's checkpoint restored) but not yet run,
    for tests that look into the stage (``engine.stage``). ``changes`` replace fields of ``cfg``; progress is off."""
    from dataclasses import replace

    from cmw_transfer.trainer.engine.launch import launch as start

    return start(replace(cfg, **{"progress": False, **changes}))


def one_error_line(err: str) -> str:
    """The one ``error: ...`` line a refusal must print (and nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]

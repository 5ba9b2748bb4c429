"""Fault injection for the resume tests, on the test side: engine callbacks that crash a run at a given step.

In-process: ``with crash_at(epoch, step, SomeError): run(...)``. In a subprocess (a real kill -9):
``python -m tests.faults KILL EPOCH:STEP -- apply ...`` registers a callback that sends the process SIGKILL (or
``INT``, ``TERM``, ...) when the engine reaches that step (1-based epoch, 0-based step), then runs the CLI with the
remaining arguments.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

from cmw_transfer.trainer.engine.loop import register_callback, remove_callback


class AtStep:
    """Call ``action()`` when the engine is about to run step ``step`` of epoch index ``epoch - 1``."""

    def __init__(self, epoch: int, step: int, action: Callable[[], None]) -> None:
        self.epoch, self.step, self.action = epoch, step, action

    def on_step(self, stage: object, epoch: int, step: int) -> None:
        if (epoch + 1, step) == (self.epoch, self.step):
            self.action()


@contextlib.contextmanager
def crash_at(epoch: int, step: int, error: type[BaseException]) -> Iterator[None]:
    def fail() -> None:
        raise error(f"injected at epoch {epoch}, step {step}")

    callback = register_callback(AtStep(epoch, step, fail))
    try:
        yield
    finally:
        remove_callback(callback)


def kill_command(epoch_step: str, *args: str, sig: str = "KILL") -> list[str]:
    """argv that runs ``cmw-transfer ARGS`` and sends itself SIG<sig> (default SIGKILL) at EPOCH:STEP."""
    return [sys.executable, "-m", "tests.faults", sig, epoch_step, "--", *args]


def _main(argv: list[str]) -> None:
    assert argv[2] == "--", argv
    sig = signal.Signals[f"SIG{argv[0]}"]
    epoch, step = (int(part) for part in argv[1].split(":"))
    register_callback(AtStep(epoch, step, lambda: os.kill(os.getpid(), sig)))
    from cmw_transfer.cli import main

    main(argv[3:])


if __name__ == "__main__":
    _main(sys.argv[1:])

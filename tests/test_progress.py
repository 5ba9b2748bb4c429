"""Progress bars only on a terminal: a piped or logged stderr gets the epoch lines, never ``\\r`` frames."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from tests.helpers import run_cli

TINY_METATRAIN = ["metatrain", "--src", "digits-pmd", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
                  "--threads", "1", "--batch-size", "128"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}


def _stderr_on_a_terminal(argv: list[str]) -> str:
    """Run ``argv`` with stderr on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no \n -> \r\n translation: every \r seen is the program's
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_a_piped_stderr_has_the_epoch_lines_and_no_bar_frames(tmp_path):
    out = run_cli(*TINY_METATRAIN, "--out", str(tmp_path / "net"), env=_env())
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "epoch=1" in out.stderr
    assert out.stdout.startswith("done: ") and out.stdout.count("\n") == 1


def test_a_terminal_gets_the_bar(tmp_path):
    text = _stderr_on_a_terminal([sys.executable, "-m", "cmw_transfer", *TINY_METATRAIN,
                                  "--out", str(tmp_path / "net")])
    assert re.search("\r(?!\n)", text) and "epoch 1/1" in text and "epoch=1" in text


def test_the_helper_follows_the_terminal():
    code = "from cmw_transfer.progress import progress_bar\nfor _ in progress_bar(range(3), mininterval=0): pass\n"
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "3/3" in _stderr_on_a_terminal([sys.executable, "-c", code])
    off = subprocess.run([sys.executable, "-c", code.replace("mininterval=0", "mininterval=0, enabled=False")],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert off.stderr == ""

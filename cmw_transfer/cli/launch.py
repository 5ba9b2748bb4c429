"""``--nproc N``: run a command under torchrun and report a failure the way one process does.

Every worker that hits a bad input prints the same ``error:`` line, and torchrun then prints a 40-line
ChildFailedError report. The workers' stderr is relayed live (progress bars included), except that error
lines are held back and torchrun's report is dropped once a worker has said what went wrong; the error is
printed once, last, with the exit code of the worker that failed first (2 for bad input).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import BinaryIO

ERROR_PREFIX = b"error: "
_SEGMENT_END = re.compile(rb"[\r\n]")
_REPORT_START = re.compile(rb"^([EWI]\d{4} .*torch/distributed/elastic|Traceback \(most recent call last\))")
_ROOT_CAUSE_EXIT = re.compile(rb"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.S)


class StderrRelay:
    """Feeds torchrun's stderr through to ``out`` segment by segment (a segment ends at ``\\r`` or ``\\n``)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pending = b""
        self.errors: list[bytes] = []
        self.report: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        data, start = self.pending + chunk, 0
        for match in _SEGMENT_END.finditer(data):
            self._segment(data[start:match.end()])
            start = match.end()
        self.pending = data[start:]

    def _segment(self, segment: bytes) -> None:
        if self.report:
            self.report.append(segment)
        elif segment.startswith(ERROR_PREFIX):
            line = segment.rstrip(b"\r\n") + b"\n"
            if line not in self.errors:
                self.errors.append(line)
        elif self.errors and _REPORT_START.match(segment):
            self.report.append(segment)
        else:
            self.out.write(segment)
            self.out.flush()

    def finish(self, returncode: int) -> int:
        """Print what was held back; the exit code the command should end with."""
        if self.pending:
            self._segment(self.pending)
            self.pending = b""
        if returncode == 0 or not self.errors:  # nothing better to show than torchrun's own words
            self.out.write(b"".join(self.report + self.errors))
            self.out.flush()
            return returncode
        self.out.write(self.errors[0])
        self.out.flush()
        root = _ROOT_CAUSE_EXIT.search(b"".join(self.report))
        if root and int(root.group(1)) > 0:
            return int(root.group(1))
        return 1 if self.errors[0].rstrip().endswith(b"please report it") else 2


def run_under_torchrun(argv: list[str]) -> int:
    """Run ``argv`` (a ``python -m torch.distributed.run ...`` command line); its exit code, errors relayed once."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    relay = StderrRelay(sys.stderr.buffer)
    try:
        assert proc.stderr is not None
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 65536), b""):
            relay.feed(chunk)
    except KeyboardInterrupt:  # the workers got the same SIGINT: let them end their epoch cleanly
        proc.wait()
        raise
    return relay.finish(proc.wait())

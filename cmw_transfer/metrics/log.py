"""``metrics.jsonl``: one strict-JSON object per epoch, append-only, safe to resume.

Strict: a non-finite float is written as ``null`` (a bare ``NaN`` is not JSON). Append-only and torn-tail safe:
each row is one ``write`` of a complete line followed by ``fsync``; a write that fails (a full disk) truncates
the file back to its previous length and raises, and a reader drops a last line that a kill -9 cut short, so a
later ``--resume`` never trips over a half-written row.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cmw_transfer.atomic import write_text
from cmw_transfer.errors import UserError
from cmw_transfer.untrusted import loads

METRICS_NAME = "metrics.jsonl"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (recursively), so it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_row(row: dict[str, Any]) -> str:
    return json.dumps(strict_json(row), sort_keys=True, allow_nan=False)


def _relabelled(row: dict[str, Any], relabel: int) -> dict[str, Any]:
    epoch = row.get("epoch")
    if relabel and isinstance(epoch, int) and not isinstance(epoch, bool):
        return {**row, "epoch": epoch + relabel}
    return row


def _os_reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


class MetricsLog:
    def __init__(self, path: str | Path, *, resume_from_epoch: int | None = None, relabel: int = 0) -> None:
        """Start empty, or on resume keep the rows of epochs before ``resume_from_epoch`` (no duplicates, no tail);
        ``relabel`` is added to the kept rows' epochs (a log that counted from another origin)."""
        self.path = Path(path)
        kept = [] if resume_from_epoch is None else \
            [row for row in (_relabelled(r, relabel) for r in self.read()) if row.get("epoch", -1) < resume_from_epoch]
        try:
            write_text(self.path, "".join(dumps_row(r) + "\n" for r in kept))
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {_os_reason(exc)}") from None

    def append(self, row: dict[str, Any]) -> None:
        data = (dumps_row(row) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, start)  # no torn line: the file is as it was before this row
                except OSError:
                    pass  # a reader drops the torn tail anyway
                raise UserError(f"cannot append to {self.path}: {_os_reason(exc)}; the log and the last "
                                "checkpoint are consistent, free space and --resume") from None
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """The rows; a last line without its newline or not parseable (a torn tail) is dropped."""
        if not self.path.is_file():
            return []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        rows: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)  # bounded nesting: a 30,000-deep line is damaged, not a crash
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                if number >= len(lines) - 1:  # the last line (written or not yet terminated): a torn tail
                    break
                raise UserError(f"{self.path}: line {number} is not a JSON object; the log is damaged "
                                "(start over with --overwrite)") from None
            rows.append(row)
        return rows

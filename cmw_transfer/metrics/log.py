"""``metrics.jsonl``: one JSON object per epoch, safe to resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmw_transfer.atomic import write_text

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, path: str | Path, *, resume_from_epoch: int | None = None) -> None:
        """On resume, drop the lines of epochs that will be re-run, so the file never has duplicates."""
        self.path = Path(path)
        if resume_from_epoch is None:
            write_text(self.path, "")
        else:
            kept = [row for row in self.read() if row.get("epoch", -1) < resume_from_epoch]
            write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

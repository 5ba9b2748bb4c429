"""What the study scripts share: their resumable ``runs.jsonl`` cache and the markdown table they print (one row
per setting, mean ± std over seeds per method)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path


def load_cache(path: Path) -> dict[str, dict]:
    """The finished runs of a study's ``runs.jsonl`` by key (a line cut short by a kill is skipped)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = row
    return done


def cell(values: list[float | None], digits: int = 1) -> str:
    """``mean ± std`` of the values that exist (``-`` when none; std 0 for a single seed)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {std:.{digits}f}"


def print_table(results: dict[str, dict[str, list[float]]], settings: list[str], methods: list[str],
                label: Callable[[str], str]) -> None:
    print("| setting | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for setting in settings:
        print(f"| {label(setting)} | " + " | ".join(cell(results[setting][m]) for m in methods) + " |")

"""What a ``--resume`` changed: the options whose new value alters the run's fingerprint, old -> new.

A checkpoint stores only the fingerprint (a hash) of the configuration it belongs to; the run directory also
holds that configuration in full (``config.json`` of an apply run, ``run.json`` of a meta-train run, the
``config`` of a probe's ``probe.json``), written with the same fingerprint. Comparing it with the new
configuration names the differing options, so a refused resume says which option to put back. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cmw_transfer.errors import UserError

SAVED_CONFIGS = ("config.json", "run.json", "probe.json")  # apply, metatrain, probe
MAX_CONFIG_BYTES = 1 << 20  # a saved configuration is a few kB; anything larger is not one


def saved_config(run_dir: str | Path, fingerprint: Any) -> dict[str, Any] | None:
    """The configuration dict saved in ``run_dir`` with this ``fingerprint``; None when no file holds it."""
    for name in SAVED_CONFIGS:
        path = Path(run_dir) / name
        try:
            if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
                continue
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
            continue
        config = record.get("config", record)
        return config if isinstance(config, dict) else None
    return None


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "(none)"
    return "(unset)" if value is None else str(value)


def changed_options(saved: dict[str, Any], current: Any) -> list[str]:
    """``["--lr 0.1 -> 0.2", ...]``: each option of ``current`` (a stage config dataclass) whose saved value, put
    back alone, changes the fingerprint; empty when ``saved`` is not a configuration of this kind."""
    try:
        old = type(current).from_dict(saved)
    except (UserError, TypeError, ValueError):
        return []
    now = current.fingerprint()
    changes = []
    for field in dataclasses.fields(current):
        before, after = getattr(old, field.name), getattr(current, field.name)
        if before == after:
            continue
        try:
            matters = dataclasses.replace(current, **{field.name: before}).fingerprint() != now
        except (TypeError, ValueError, UserError):
            matters = True
        if matters:
            changes.append(f"--{field.name.replace('_', '-')} {_shown(before)} -> {_shown(after)}")
    return changes


def mismatch_message(path: Path, saved_fingerprint: Any, current: Any | None, fingerprint: str) -> str:
    """The refusal of a resume whose configuration differs: the changed options when the run directory says, else
    the two fingerprints."""
    what = f"({saved_fingerprint} != {fingerprint})"
    saved = saved_config(path.parent, saved_fingerprint) if current is not None else None
    changes = changed_options(saved, current) if saved is not None else []
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        what = f"(changed: {shown})"
    return (f"--resume: {path} belongs to a run with a different configuration {what}; use the original options "
            "or another --out")

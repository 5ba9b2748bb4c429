"""Checkpoints: written atomically, read with ``weights_only=True``, tied to the run configuration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from cmw_transfer.atomic import atomic_path
from cmw_transfer.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"


def config_fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Hash of the settings that must match for a resume to continue the same run."""
    kept = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, fingerprint: str) -> dict[str, Any]:
    """Load for ``--resume``; a checkpoint of a different configuration is refused, nothing is overwritten."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}; start without --resume or point --out at the run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--resume: {path} is not a readable checkpoint ({exc.__class__.__name__}); "
                        "delete it to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"--resume: {path} belongs to a run with a different configuration "
                        f"({state.get('fingerprint')} != {fingerprint}); use the original options or another --out")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

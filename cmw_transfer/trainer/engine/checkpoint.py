"""Checkpoints: written atomically, read with ``weights_only=True``, tied to the run, validated before use.

A checkpoint is a dict: the engine's keys (``fingerprint``, ``epoch`` = label of the last finished epoch,
``identity``) plus the stage's state. ``identity`` holds what the configuration cannot name but a resume must
match: the weighting artifact's content digest (a different net at the same ``--weights`` path), the resolved
hub revision, the length of the lr schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmw_transfer.atomic import atomic_path
from cmw_transfer.config_diff import mismatch_message
from cmw_transfer.errors import UserError
from cmw_transfer.untrusted import quiet_warnings

CHECKPOINT_NAME = "checkpoint.pt"
ENGINE_KEYS = ("fingerprint", "epoch", "identity")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomic: a failed or killed write leaves the previous checkpoint as it was."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError of its zip writer
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise UserError(f"cannot write the checkpoint {path}: {reason}; the previous checkpoint is intact") from None


def load_checkpoint(path: str | Path, fingerprint: str, config: Any = None) -> dict[str, Any]:
    """Load for ``--resume``; a checkpoint of a different configuration is refused, nothing is overwritten. With
    the run's ``config`` (a stage config) the refusal names the options that differ from the saved ones."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}; start without --resume or point --out at the run")
    try:
        with quiet_warnings():  # torch's "Detected pickle protocol" would precede the one error line
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--resume: {path} is not a readable checkpoint ({exc.__class__.__name__}); "
                        "delete it to start over") from None
    if not isinstance(state, dict):
        raise UserError(f"--resume: {path} holds a {type(state).__name__}, not a checkpoint of this toolkit; "
                        "delete it to start over")
    if state.get("fingerprint") != fingerprint:
        raise UserError(mismatch_message(path, state.get("fingerprint"), config, fingerprint))
    return state


def check_structure(state: dict[str, Any], path: Path, *, required: tuple[str, ...], first_epoch: int,
                    total_epochs: int, identity: dict[str, Any]) -> int:
    """Validate a fingerprint-matching checkpoint before anything is restored; returns the next epoch index."""
    missing = [k for k in (*ENGINE_KEYS, *required) if k not in state]
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing)}: it is damaged or from another version; "
                        "delete it (or use --overwrite) to start over")
    epoch = state["epoch"]
    last = first_epoch + total_epochs - 1
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not first_epoch <= epoch <= last:
        raise UserError(f"--resume: {path} says epoch {epoch!r}, outside this run's epochs {first_epoch}..{last}; "
                        "it is damaged: delete it (or use --overwrite) to start over")
    saved = state["identity"]
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} is damaged (identity is a {type(saved).__name__}); delete it")
    for key, now in identity.items():
        if saved.get(key) != now:
            raise UserError(f"--resume: {path} was written with {key} {saved.get(key)!r}, this run has {now!r}; "
                            "use the original inputs, or --overwrite / another --out to start a new run")
    return epoch - first_epoch + 1


def restore_error(path: Path, exc: BaseException) -> UserError:
    """A state that does not fit the model or optimizer (shapes, keys, types), as one line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return UserError(f"--resume: {path} does not fit this run ({first[:300]}); it is damaged or from another "
                     "version: delete it (or use --overwrite) to start over")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

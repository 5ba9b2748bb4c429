"""Atomic file output: readers see the old file or the new one, never half of one.

The temporary file is created with mode 0666 minus the umask, as ``open()`` would create the final file
(``tempfile.mkstemp`` would make every output 0600, unreadable to a team on shared storage).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmw_transfer.errors import is_stream_write_failure, write_error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A write that fails for a reason of the machine (full disk, read-only mount, missing folder) is a UserError
    naming ``path`` and the OS error; the old file, if any, is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temporary(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except Exception as exc:  # a full disk, a read-only mount, torch.save's or safetensors' writer failing
        if not isinstance(exc, OSError) and not is_stream_write_failure(exc):
            raise
        raise write_error(path, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _create_temporary(path: Path) -> Path:
    """A new, empty ``.NAME.XXXX.tmp`` beside ``path``, created exclusively with the umask applied."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)

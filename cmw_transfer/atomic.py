"""Atomic file output: readers see the old file or the new one, never half of one.

Only a regular file is ever replaced. An existing target that is a directory, a character or block device, a
FIFO or a socket is one UserError saying what it is, before anything is written: a rename over it would turn
``/dev/null`` or a named pipe into a PNG. The check is repeated just before the rename (what is left is the
window between that check and ``rename(2)``, which no POSIX call closes).

A symlink as the target is written *through*: the new file replaces the regular file the link resolves to (the
temporary is made in that file's folder, so the rename stays on one file system) and the link itself stays. That
is what ``open(path, "w")`` does, so a run folder whose files are links into shared storage keeps working;
renaming over the link would silently cut it, and refusing would break such layouts for no gain in safety (the
user could name the resolved path directly). A link that resolves to something other than a regular file is
refused like that thing; a dangling link creates its target, as ``open`` would; a loop is one line (ELOOP).

Every output gets mode 0666 minus the umask, as ``open()`` would create the final file: the temporary is created
that way, and its mode is restored after the block in case the writer re-created it (``tempfile.mkstemp`` and
safetensors' own ``save_file`` / ``save_model`` make 0600 files, unreadable to a team on shared storage).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmw_transfer.errors import UserError, is_stream_write_failure, write_error

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISREG, "a regular file"))


def file_kind(mode: int) -> str:
    """``"a directory"``, ``"a FIFO (named pipe)"``, ...: what an ``st_mode`` is, for messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: Path, kind: str, resolved: Path | None = None) -> UserError:
    via = f" (a symbolic link to {resolved}, which is {kind})" if resolved is not None else f": it is {kind}"
    return UserError(f"cannot write {path}{via}, not a regular file; give the path of a file to create or replace")


def output_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` creates or replaces: ``path``, or the file its symlink resolves to.

    Raises a UserError if that is anything but a regular file or nothing (see the module docstring).
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise write_error(path, exc) from None
    if stat.S_ISREG(st.st_mode):
        return path
    if not stat.S_ISLNK(st.st_mode):
        raise _refuse(path, file_kind(st.st_mode))
    try:
        resolved = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return Path(os.path.realpath(path))  # dangling: the write creates what the link names
    except OSError as exc:  # ELOOP
        raise write_error(path, exc) from None
    st = os.stat(resolved)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, file_kind(st.st_mode), resolved)
    return resolved


def check_regular(path: str | os.PathLike) -> None:
    """Refuse (one UserError) a ``path`` that exists and is not a regular file (nor a link to one); for writers
    that cannot go through :func:`atomic_path` (an append-only log, a memory map updated in place)."""
    output_target(path)


def _replace(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``, never over a non-regular ``dst`` (checked right before the rename)."""
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(dst, file_kind(st.st_mode))
    os.replace(src, dst)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (beside the file a symlink ``path`` resolves to); rename it over
    that file only if the block succeeds.

    A target that is not a regular file is a UserError before the block runs. A write that fails for a reason of
    the machine (full disk, read-only mount, missing folder) is a UserError naming ``path`` and the OS error; the
    old file, if any, is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    target = output_target(path)
    try:
        tmp_path, mode = _create_temporary(target)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) != mode:  # the writer re-created the file (safetensors)
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        _replace(tmp_path, target)
    except Exception as exc:  # a full disk, a read-only mount, torch.save's or safetensors' writer failing
        if not isinstance(exc, OSError) and not is_stream_write_failure(exc):
            raise
        raise write_error(path, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new, empty ``.NAME.XXXX.tmp`` beside ``path``, created exclusively with the umask applied, and its mode."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return candidate, mode
    raise FileExistsError(f"could not create a temporary file beside {path}")


def temporary_directory(path: Path) -> Path:
    """A new, empty ``.NAME.XXXX.tmp`` folder beside ``path`` with mode 0777 minus the umask, as ``mkdir(1)``
    makes it (``tempfile.mkdtemp`` makes 0700 folders: renamed into place, an output nobody else can read)."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(candidate, 0o777)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary folder beside {path}")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)

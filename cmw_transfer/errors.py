"""The one exception type that means "the user's input is wrong", and the one wording of a failed write.

The CLI turns a UserError into a single ``error: ...`` line and exit code 2; anything else is a bug (exit 1).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input: a message that says what is wrong and what to do about it."""


# errno values that describe the environment (a full disk, a read-only mount, a wrong path), not a bug
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO, errno.ENOENT,
    errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EXDEV, errno.EMFILE,
    errno.ENFILE, errno.EBUSY, errno.ETXTBSY,
})
_LOW_SPACE = 1 << 20  # free bytes under which a write failure without an errno is reported as a full disk


def is_environment_error(exc: BaseException) -> bool:
    """An OSError about a path or the machine's storage (exit 2), as opposed to one that reveals a bug."""
    return isinstance(exc, OSError) and (exc.filename is not None or exc.errno in ENVIRONMENT_ERRNOS)


def is_stream_write_failure(exc: BaseException) -> bool:
    """torch.save's C++ writer and safetensors' Rust serializer report a failed write (ENOSPC, EIO) without an
    errno: a RuntimeError naming the stream writer, a ``SafetensorError`` with an "I/O error"."""
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        return "I/O error" in text
    return isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)


def write_error(path: str | os.PathLike, exc: BaseException, action: str = "write") -> UserError:
    """``cannot write PATH: <OS error>`` for an OSError or a torch.save failure at ``path``."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or exc.__class__.__name__
    else:
        reason = f"the write failed ({str(exc).split('] ', 1)[-1].lstrip('. ')})"
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = None
        if free is not None and free < _LOW_SPACE:
            reason = f"{os.strerror(errno.ENOSPC)} ({free} bytes free)"
    return UserError(f"cannot {action} {path}: {reason}")

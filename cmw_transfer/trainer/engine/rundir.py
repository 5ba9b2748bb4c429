"""The run directory (``--out``): what may be written where, one writer at a time, no stale temporaries.

Policy, checked before any data or model is loaded (:meth:`RunDirectory.check`) and again under the lock:

- ``--out ""``, an existing file, or a path under a file are refused;
- a directory holding a run of another kind (an apply run, a meta-train run) or a saved net is refused whatever
  the flags: ``--overwrite`` replaces a run of the same kind only;
- a directory holding this kind's run needs ``--resume`` (continue) or ``--overwrite`` (start over); one
  holding files this stage would overwrite needs ``--overwrite``.

The lock is ``.lock`` in the directory (``fcntl.flock``, so a process killed with SIGKILL releases it; the file
names the holder's pid for the message) and is removed when the run ends. With the lock held every
``.NAME.*.tmp`` left by :func:`cmw_transfer.atomic.atomic_path` belongs to a dead writer and is deleted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cmw_transfer.atomic import file_kind
from cmw_transfer.errors import UserError

LOCK_NAME = ".lock"
LOG_FILES = ("metrics.csv", "tensorboard")  # --log csv,tensorboard (cmw_transfer.metrics.loggers)
RUN_FILES = {  # what each kind writes (the last two are the exported net's)
    "apply": ("config.json", "families.json", "metrics.jsonl", "checkpoint.pt", "summary.json",
              "classifier.safetensors", "classifier_best.safetensors", "training.png", *LOG_FILES),
    "metatrain": ("run.json", "checkpoint.pt", "metrics.jsonl", "model.safetensors", "config.json", "README.md",
                  "curves.png", "classifier.safetensors", "classifier.json", *LOG_FILES),
    "probe": ("probe.json", "losses.npy", "labels.npy", "checkpoint.pt", "metrics.jsonl", "summary.json",
              *LOG_FILES),
}
KIND_NAMES = {"apply": "an apply run", "metatrain": "a meta-train run", "net": "a saved weighting net",
              "probe": "a loss-curve probe"}


def detect_kind(path: Path) -> str | None:
    """``"metatrain"``, ``"net"``, ``"probe"``, ``"apply"`` or None (no run: missing, empty or unrelated files)."""
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if "probe.json" in names:
        return "probe"
    if "run.json" in names:
        return "metatrain"
    if "model.safetensors" in names:
        return "net"
    if names & {"checkpoint.pt", "families.json", "summary.json", "classifier.safetensors"}:
        return "apply"
    return None


class RunDirectory:
    def __init__(self, out: str, kind: str, *, resume: bool = False, overwrite: bool = False) -> None:
        if not str(out).strip():
            raise UserError("--out is empty: name the run directory (an empty --out would write into the current "
                            "directory)")
        self.path, self.kind, self.resume, self.overwrite = Path(out), kind, resume, overwrite
        self._fd: int | None = None

    def check(self) -> None:
        """Refuse an ``--out`` this run must not write into; writes nothing."""
        path = self.path
        for parent in (path, *path.parents):
            if parent.exists() and not parent.is_dir():
                where = "is" if parent == path else f"is under {parent}, which is"
                raise UserError(f"--out {path} {where} a file, not a directory; choose another --out")
            if parent.exists():
                break
        found = detect_kind(path)
        if found is not None and found != self.kind:
            raise UserError(f"--out {path} holds {KIND_NAMES[found]}; {self.kind} will not write into it (not even "
                            "with --overwrite): choose another --out")
        if self.resume or self.overwrite:
            return
        if found == self.kind and ((path / "checkpoint.pt").exists() or self.kind == "metatrain"):
            held = {"metatrain": "run.json"}.get(self.kind, "checkpoint.pt")
            raise UserError(f"{path} already holds a run ({held}); "
                            "use --resume to continue it, --overwrite to start over, or another --out")
        clash = sorted(n for n in RUN_FILES[self.kind] if (path / n).exists())
        if clash:
            raise UserError(f"--out {path} already holds {', '.join(clash)}; use --overwrite to replace them, or "
                            "another --out")

    # -- the lock ---------------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the directory, take the lock (or refuse: another live run holds it), clean dead temporaries."""
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {self.path}: cannot create it ({exc.strerror or exc})") from None
        self._fd = _lock(self.path / LOCK_NAME)
        self.check()  # another run may have written here between the first check and the lock
        self.clean_stale_temporaries()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def clean_stale_temporaries(self) -> list[Path]:
        names = {name for files in RUN_FILES.values() for name in files}
        removed = []
        for tmp in self.path.glob(".*.tmp"):
            if any(tmp.name.startswith(f".{name}.") for name in names):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed

    def __enter__(self) -> RunDirectory:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lock(path: Path) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"--out {path.parent}: cannot write there ({exc.strerror or exc})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted as .lock
            os.close(fd)
            raise UserError(f"--out {path.parent}: {path.name} is {file_kind(os.stat(path).st_mode)}, not a lock "
                            "file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"--out {path.parent} is in use by another run (pid {holder}); wait for it to finish or "
                            "choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked while this process was opening it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)

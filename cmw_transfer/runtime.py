"""CPU budget per process: torch intra-op threads and DataLoader workers that fit the machine.

The default (torch's own) is one thread per core in *every* process; with DataLoader workers, or several DDP
ranks on one machine, that oversubscribes the cores and a loaded box slows down many-fold. The policy here: the
CPUs this process may use (its affinity mask) are shared evenly by the ranks on this machine
(``LOCAL_WORLD_SIZE``, set by torchrun), each rank computes on its share, and keeps at most 4 of it, minus one
for itself, as loader workers. An explicit request (``--threads`` / ``--workers``) or ``OMP_NUM_THREADS`` wins.

Call :func:`configure_threads` once per process (per rank) before building the model; :func:`default_workers`
gives the ``--workers`` default.
"""

from __future__ import annotations

import os

MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which container CPU limits shrink), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def local_world_size(default: int = 1) -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE, else ``default``."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", default)))
    except ValueError:
        return max(1, default)


def cpus_per_process(local_ranks: int | None = None) -> int:
    return max(1, available_cpus() // (local_ranks or local_world_size()))


def default_workers(local_ranks: int | None = None) -> int:
    """``--workers`` default: ``min(4, CPUs per rank - 1)``; the main process keeps one CPU, so a 2-CPU machine gets
    1 worker and a 1-CPU one loads in the main process."""
    return max(0, min(MAX_DEFAULT_WORKERS, cpus_per_process(local_ranks) - 1))


def configure_threads(requested: int | None = None, world_size: int | None = None) -> int:
    """Set torch's intra-op threads for this process and return the number in use.

    ``requested`` (``--threads``) wins; else ``OMP_NUM_THREADS`` if set (torch already honours it); else the CPUs
    of this machine divided by the ranks on it (``world_size`` if given, else ``LOCAL_WORLD_SIZE``).
    """
    import torch

    if requested is not None:
        if requested < 1:
            from cmw_transfer.errors import UserError

            raise UserError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(int(requested))
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpus_per_process(world_size))
    return torch.get_num_threads()


def check_free_space(directory: str | os.PathLike, need: int, what: str, fix: str) -> None:
    """Refuse (UserError) an output of ``need`` bytes that the file system under ``directory`` (or its nearest
    existing parent) cannot hold: said before the work starts rather than as a sparse file that fills up later."""
    import shutil
    from pathlib import Path

    from cmw_transfer.errors import UserError

    place = Path(directory).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:  # nothing to measure with: the write reports its own failure
        return
    if need > free:
        raise UserError(f"{what} take {_size(need)} but {place} has only {_size(free)} free; {fix}")


def _size(n: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"

"""Deterministic data loading: seeds, samplers and loaders whose order is a function of ``(seed, epoch)``.

Everything here is chosen so that a run is a pure function of its configuration: shuffling and worker seeds are
derived from ``(seed, epoch)`` rather than from a generator that advances through the run, so a run resumed at
epoch ``e`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cmw_transfer.errors import UserError


# -- seeds ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): the part of reproducibility a seed can buy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (seed, epoch, rank, ...), without Python's salted ``hash``."""
    state = np.random.SeedSequence([int(p) % 2**32 for p in parts])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _seed_worker(worker_id: int) -> None:
    """torch seeds each worker from the loader's generator; NumPy and ``random`` follow from it.

    Workers ignore SIGINT (Ctrl-C reaches the whole process group): the main process (the engine) handles it
    once and shuts the workers down, instead of a worker dying first and the interrupt surfacing as "DataLoader
    worker exited unexpectedly". SIGTERM keeps its default: the loader's own shutdown terminates workers with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    base = torch.initial_seed() % 2**32
    np.random.seed(base)
    random.seed(base)


# -- loaders ------------------------------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """Single-process sampler whose order is a function of ``(seed, epoch)`` only; ``set_epoch`` like DDP's."""

    def __init__(self, length: int, *, shuffle: bool, seed: int) -> None:
        self.length, self.shuffle, self.seed, self.epoch = int(length), shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


class ShardSampler(Sampler[int]):
    """Evaluation shard ``rank::world`` without DistributedSampler's padding, so reduced metrics are exact."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, int(length), world_size))

    def set_epoch(self, epoch: int) -> None:  # for a uniform interface
        pass

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _EpochKeys(Sampler):
    """Yields ``(epoch, index)`` so that a persistent worker knows which epoch a sample belongs to."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.inner, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class SeededPerSample(Dataset):
    """``ds[i]`` with torch / NumPy / ``random`` seeded from ``(seed, epoch, i)`` first: a sample's augmentation
    is a function of the run, not of which persistent worker loaded it or what it loaded before."""

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.ds, self.seed = ds, int(seed)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed = derive_seed(self.seed, epoch, index)
        torch.default_generator.manual_seed(seed)  # CPU only (workers make CPU tensors): 100x cheaper than manual_seed
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return self.ds[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A whole batch at once where nothing is random (an in-memory set without a transform: its own
        ``__getitems__``); otherwise sample by sample, each seeded."""
        fetch = getattr(self.ds, "__getitems__", None)
        if fetch is not None and getattr(self.ds, "transform", True) is None:
            return fetch([index for _epoch, index in keys])
        return [self[key] for key in keys]

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (targets, classes, ...)
        if name in ("ds", "seed") or name.startswith("__"):  # never a protocol method of the wrapped dataset
            raise AttributeError(name)
        return getattr(self.ds, name)


class EpochLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` also re-seeds the worker seeds, so epoch ``e`` is reproducible alone.

    With workers, they are persistent (started once, not per epoch: faster, and no worker start-up racing an
    interrupt at an epoch boundary); each sample is then seeded from ``(seed, epoch, index)``
    (:class:`SeededPerSample`), so resume stays exact. Without workers the main process's streams, re-seeded per
    epoch by the engine, drive the augmentation as before.
    """

    def __init__(self, dataset: Dataset, *args: Any, base_seed: int = 0, **kwargs: Any) -> None:
        self.base_seed = int(base_seed)
        if kwargs.get("num_workers", 0) > 0:
            kwargs["persistent_workers"] = True
            kwargs["sampler"] = _EpochKeys(kwargs["sampler"])
            dataset = SeededPerSample(dataset, self.base_seed)
        super().__init__(dataset, *args, **kwargs)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(derive_seed(self.base_seed, epoch))


def _default_collate() -> Callable[[list], Any] | None:
    try:  # skips unreadable images (returns None for an all-bad batch); the loops tolerate a None batch
        from cmw_transfer.dataset import skip_unreadable_collate
    except ImportError:  # pragma: no cover - the dataset package is part of the distribution
        return None
    return skip_unreadable_collate


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int,
    seed: int,
    distributed: bool,
    drop_last: bool | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    pin_memory: bool | None = None,
) -> EpochLoader:
    """Train loaders shuffle deterministically from ``seed`` (DistributedSampler under DDP); eval loaders shard.

    Call ``loader.set_epoch(epoch)`` before each epoch. ``drop_last`` defaults to ``train`` so that BatchNorm
    never sees a batch of one; a training set smaller than one batch keeps its only, partial batch.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    n = len(ds)  # type: ignore[arg-type]
    use_dist = distributed and dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if use_dist else (1, 0)
    if drop_last is None:
        drop_last = train and n // world >= batch_size
    sampler: Sampler[int]
    if train and use_dist:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    elif train:
        sampler = EpochSampler(n, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(n, rank, world)
    generator = torch.Generator()
    return EpochLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn if collate_fn is not None else _default_collate(),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        worker_init_fn=_seed_worker,
        generator=generator,
        base_seed=derive_seed(seed, rank),
    )

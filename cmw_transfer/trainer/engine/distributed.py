"""Device and process group: the one process of a run, or one rank of a torchrun job, and its collectives."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from cmw_transfer.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when present, else CPU; a CUDA request on a machine without one is a user error."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device


class DistributedContext:
    """One process of a torchrun job (or the only process): rank bookkeeping and the few collectives we need.

    ``from_env`` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; with ``WORLD_SIZE`` > 1 it joins
    the process group (nccl on CUDA, gloo on CPU). Without them every collective is the identity, so the same
    training code runs single-process.
    """

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 backend: str | None = None) -> None:
        self.device, self.rank, self.world_size, self.local_rank = device, rank, world_size, local_rank
        self.backend = backend

    @classmethod
    def from_env(cls, device: str | None = None, *, timeout_s: float = 1800.0) -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(resolve_device(device))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        wanted = resolve_device(device)
        if wanted.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                                "lower --nproc_per_node")
            resolved, backend = torch.device("cuda", local_rank), "nccl"
            torch.cuda.set_device(resolved)
        else:
            resolved, backend = wanted, "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(resolved, rank, world, local_rank, backend)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _reduce(self, value: torch.Tensor | float | Sequence[float], op: Any) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float64).clone()
        if not self.enabled:
            return tensor
        # gloo reduces CPU tensors, nccl CUDA ones
        on = tensor.to(self.device) if self.backend == "nccl" else tensor
        dist.all_reduce(on, op=op)
        return on.cpu()

    def all_reduce_sum(self, value: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        """Sum over ranks (float64 on CPU): counts and totals."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def all_reduce_mean(self, value: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        return self.all_reduce_sum(value) / self.world_size

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a picklable value), e.g. to check that all ranks agree on the families."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def teardown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

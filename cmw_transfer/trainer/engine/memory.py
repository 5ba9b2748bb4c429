"""Will one training step fit in memory? Estimated before any data is loaded, refused in one line if it cannot.

A large ``--img-size`` with a big batch or model would otherwise grow until the kernel kills the process (no
message, no checkpoint). The estimate costs no memory: the model is built on PyTorch's ``meta`` device (shapes
without storage) and one forward of a two-sample batch at the planned input size records, through
:func:`torch.autograd.graph.saved_tensors_hooks`, every tensor autograd keeps for the backward pass; those bytes
per sample times the batch size are the activations of a step. Weights, their gradients and the optimizer's
momentum add three copies of the parameters. Everything else (the backward's transient buffers, the allocator's
slack, data-loader workers) is left out, so the estimate is a lower bound of the real peak: a run is refused only
when even that cannot fit in the memory available now (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``
of ``/proc/meminfo``, capped by the cgroup's limit). Where neither is known (other devices, other systems) or the
model cannot be traced on ``meta``, nothing is checked. ``CMW_NO_MEMORY_CHECK=1`` turns the check off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cmw_transfer.errors import UserError

DISABLE_ENV = "CMW_NO_MEMORY_CHECK"
PARAMETER_COPIES = 3  # weights, gradients, SGD momentum
IN_MEMORY = ("digits", "cifar10", "cifar100")  # 8x8 / 32x32 tensors unless --img-size
_GIB = 1024**3
_CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


@dataclass(frozen=True)
class StepEstimate:
    """Bytes of one training step: activations kept for the backward pass per sample, and parameter bytes."""

    activation_bytes_per_sample: int
    parameter_bytes: int

    def total(self, samples: int) -> int:
        return samples * self.activation_bytes_per_sample + PARAMETER_COPIES * self.parameter_bytes

    def samples_that_fit(self, available: int) -> int:
        room = available - PARAMETER_COPIES * self.parameter_bytes
        return max(0, room // max(self.activation_bytes_per_sample, 1))


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the storage behind ``tensor``: views of one tensor are counted once."""
    try:
        storage = tensor.untyped_storage()
        return storage._cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(tensor), tensor.numel() * tensor.element_size()


def _build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    try:
        with torch.device("meta"):
            return build()
    except UserError:
        raise
    except Exception:  # an initialiser that reads a value (``.item()``) cannot run on meta: build, then move
        return build().to("meta")


def planned_geometry(dataset: str, img_size: int | None) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the model will be fed, known before loading: ``--img-size``, else timm's default size for
    image files; None for the in-memory datasets at their own small size (nothing to fear there)."""
    from cmw_transfer.dataset import resolve_source
    from cmw_transfer.dataset.images import DEFAULT_INPUT_SIZE

    if img_size is not None:
        return (3, int(img_size), int(img_size))
    base, _ = resolve_source(dataset)
    if base in IN_MEMORY:
        return None
    return (3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)


def estimate_step(build: Callable[[], nn.Module], geometry: tuple[int, int, int]) -> StepEstimate | None:
    """The :class:`StepEstimate` of the model ``build()`` makes at inputs of ``geometry`` (C, H, W), in float32;
    None when the model cannot be built or run on the ``meta`` device (then nothing is known)."""
    try:
        model = _build_on_meta(build).train()
        params = {_storage_key(p)[0] for p in model.parameters()} | {_storage_key(b)[0] for b in model.buffers()}
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key, size = _storage_key(tensor)
            if key not in params:
                saved[key] = max(saved.get(key, 0), size)
            return tensor

        batch = 2  # two samples: BatchNorm refuses a single value per channel in training mode
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.zeros((batch, *geometry), device="meta"))
    except Exception:  # the model's own checks (input size, ...) speak later, with the real data
        return None
    return StepEstimate(sum(saved.values()) // batch, parameter_bytes)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on ``device`` now; None where it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    free = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")),
                None)
    if free is None:
        return None
    for limit_file, usage_file in _CGROUP_LIMITS:  # a container's limit, when below what the host has free
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            free = min(free, max(0, limit - usage))
            break
    return free


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def check_step_fits(build: Callable[[], nn.Module], model_name: str, geometry: tuple[int, int, int],
                    batch_size: int, device: torch.device, *, extra_samples: int = 0, processes: int = 1,
                    half_precision: bool = False) -> StepEstimate | None:
    """Refuse (UserError) a step whose lower-bound estimate exceeds the memory available on ``device``.

    ``extra_samples``: samples of a second forward kept in the same step (the meta batch of meta-training);
    ``processes``: ranks sharing this memory (CPU ranks of one machine); ``half_precision``: activations under
    ``--amp`` (16-bit: half the bytes). Returns the estimate (None: nothing was checked).
    """
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return None
    available = available_memory(device)
    if available is None:
        return None
    estimate = estimate_step(build, geometry)
    if estimate is None:
        return None
    if half_precision:
        estimate = StepEstimate(estimate.activation_bytes_per_sample // 2, estimate.parameter_bytes)
    samples = batch_size + extra_samples
    need = processes * estimate.total(samples)
    if need <= available:
        return estimate
    fits = estimate.samples_that_fit(available // processes) - extra_samples
    channels, height, width = geometry
    advice = (f"lower --batch-size (at most {fits} fits) or --img-size" if fits >= 1 else
              "not even one sample fits: lower --img-size or use a smaller --model")
    shared = f" x {processes} processes" if processes > 1 else ""
    raise UserError(
        f"one training step of {model_name} at {channels}x{height}x{width} with {samples} samples{shared} needs at "
        f"least {_gib(need)} ({_gib(estimate.activation_bytes_per_sample)} of activations per sample, "
        f"{_gib(PARAMETER_COPIES * estimate.parameter_bytes)} of weights, gradients and momentum) but "
        f"{_gib(available)} is available on {device.type}: {advice} (or set {DISABLE_ENV}=1 to skip this check)")


def check_model_fits(model: str, dataset: str, batch_size: int, device: torch.device, *, img_size: int | None = None,
                     extra_samples: int = 0, processes: int = 1, half_precision: bool = False) -> None:
    """:func:`check_step_fits` for ``--model`` on ``--dataset`` at its planned input size (nothing to check for the
    in-memory datasets at their own small size): what the stages run before any data is loaded."""
    from cmw_transfer.models import create_model

    geometry = planned_geometry(dataset, img_size)
    if geometry is None:
        return
    check_step_fits(lambda: create_model(model, num_classes=2, in_chans=geometry[0], img_size=img_size), model,
                    geometry, batch_size, device, extra_samples=extra_samples, processes=processes,
                    half_precision=half_precision)

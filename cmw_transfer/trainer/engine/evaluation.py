"""Evaluation every stage shares: top-1/top-5 and shot splits, single-process or sharded under DDP, and AMP.

Exact under DDP: each rank evaluates its shard (``ShardSampler``, no padding) and per-class hit counts are summed
over ranks, so the reduced numbers equal a single-process evaluation of the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from cmw_transfer.metrics.accuracy import shot_masks, topk_correct
from cmw_transfer.trainer.engine.distributed import DistributedContext


def device_batches(loader: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's ``(x, y)`` on ``device``, skipping a batch whose images were all unreadable (empty or None)."""
    for batch in loader:
        if batch is None or batch[1].numel() == 0:
            continue
        yield batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``--amp`` (``dtype`` from :func:`amp_dtype`), a no-op context otherwise."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def amp_setup(enabled: bool, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``--amp``: float16 with a grad scaler on CUDA, bfloat16 (no scaler needed) elsewhere."""
    if not enabled:
        return None, None
    if device.type == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


@torch.no_grad()
def evaluate_sharded(model: nn.Module, loader: Any, ctx: DistributedContext, num_classes: int,
                     train_counts: np.ndarray | None, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """top-1/top-5 (%) and many/medium/few-shot top-1, exact under DDP: per-class hit counts summed over ranks."""
    model.eval()
    device = ctx.device
    hits = torch.zeros(3, num_classes, dtype=torch.float64, device=device)  # top1, top5, total per class
    for x, y in device_batches(loader, device):
        with autocast(device, amp_dtype):
            logits = model(x)
        top = topk_correct(logits.float(), y)
        hits[0].index_add_(0, y, top[1].double())
        hits[1].index_add_(0, y, top[5].double())
        hits[2].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    hits = ctx.all_reduce_sum(hits.cpu()).numpy()
    total = hits[2].sum()
    if total == 0:
        return {"top1": None, "top5": None, "n": 0}
    out: dict[str, Any] = {"top1": 100.0 * hits[0].sum() / total, "top5": 100.0 * hits[1].sum() / total,
                           "n": int(total),
                           "per_class_top1": [round(100.0 * float(h / t), 4) if t else None
                                              for h, t in zip(hits[0], hits[2])]}
    if train_counts is not None:
        for name, mask in shot_masks(train_counts).items():
            n = hits[2][mask].sum()
            out[f"{name}_top1"] = 100.0 * float(hits[0][mask].sum() / n) if n else None
            out[f"{name}_n"] = int(n)
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}




def sync_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Rank 0's buffers (BatchNorm statistics: per rank in training) on every rank, so that every shard is
    evaluated with the model that rank 0 checkpoints. DDP broadcasts them before each forward anyway."""
    if ctx.enabled:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)



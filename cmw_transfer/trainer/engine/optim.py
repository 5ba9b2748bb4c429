"""The optimizer and lr schedule of a stage: timm's factories, their failures as one-line user errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm.optim
import timm.scheduler
import torch
from torch import nn

from cmw_transfer.errors import UserError

SCHEDULERS = ("cosine", "step", "multistep", "tanh", "poly", "constant", "wsd", "rsqrt", "none")


def create_optimizer_and_scheduler(
    model: nn.Module,
    *,
    opt: str = "sgd",
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    sched: str = "cosine",
    epochs: int = 100,
    warmup_lr_epochs: int = 0,
    steps_per_epoch: int = 1,
    min_lr: float = 0.0,
    decay_milestones: Sequence[int] = (),
    decay_rate: float = 0.1,
) -> tuple[torch.optim.Optimizer, Any]:
    """timm's optimizer and scheduler factories, with their ``ValueError``s turned into user errors.

    The scheduler (``None`` for ``sched="none"``) steps per update: call ``scheduler.step_update(num_updates)``
    after every optimizer step. ``warmup_lr_epochs`` is timm's linear lr warm-up, unrelated to the CE warm-up
    epochs of the CMW-Net recipe.

    Size: one keyword per option of timm's two factories that the stages set (all keyword-only, with defaults).
    """
    if lr <= 0:
        raise UserError(f"--lr must be > 0, got {lr}")
    try:
        optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay,
                                                   momentum=momentum)
    except (ValueError, AssertionError, KeyError) as exc:
        raise UserError(f"--opt '{opt}': {exc}; see timm.optim.list_optimizers()") from None
    if sched not in SCHEDULERS:
        raise UserError(f"--sched '{sched}' is not supported; use one of {', '.join(SCHEDULERS)}")
    milestones = list(decay_milestones) or [max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))]
    try:
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_lr_epochs, warmup_lr=lr * 0.01,
            min_lr=min_lr, decay_milestones=milestones, decay_rate=decay_rate, step_on_epochs=False,
            updates_per_epoch=max(1, steps_per_epoch),
        )
    except ValueError as exc:
        raise UserError(f"--sched '{sched}': {exc}") from None
    return optimizer, scheduler

"""The apply stage's step: pure loss pieces, and the stepper the engine calls once per batch.

The loss functions are pure: (logits, labels, criterion state) -> (loss, per-sample losses, weights). The
stepper owns what a step mutates (optimizer, scheduler, scaler, teacher, on-device statistics) and is also what
``scripts/bench_apply.py`` times. The cost over plain ERM is one tiny-net forward on detached losses per step: no
extra model forward (outside SL mode, whose teacher forward is the method), no per-sample Python loop, no host
synchronisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.evaluation import autocast
from cmw_transfer.weighting.base import Criterion
from cmw_transfer.weighting.cmw import CMWLoss
from cmw_transfer.weighting.soft_labels import (
    PseudoLabelBank,
    make_teacher,
    mix_inputs,
    mixup_losses,
    sample_mixup,
    soft_label_loss,
    teacher_probs,
)


def weighted_ce(logits: torch.Tensor, y: torch.Tensor, criterion: Criterion | None, weighted: bool,
                idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, per-sample losses, weights or None): the criterion's weighted loss (its own, e.g. EQL's softmax) or
    the plain mean CE (the warm-up, the ERM baseline)."""
    if weighted and criterion is not None:
        return criterion.weighted_loss(logits.float(), y, idx)
    losses = F.cross_entropy(logits.float(), y, reduction="none")
    return losses.mean(), losses, None


def soft_label_objective(logits: torch.Tensor, y: torch.Tensor, pseudo: torch.Tensor, criterion: Criterion | None,
                         lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, per-sample CE of the first label, its weights or None): CMW-Net-SL's loss of a mixed batch."""
    logits = logits.float()
    labels, losses2 = mixup_losses(logits, y, perm)
    v = criterion.applied_weights(losses2, labels) if criterion is not None else torch.ones_like(losses2)
    size = y.shape[0]
    loss = soft_label_loss(logits, y, pseudo, (v[:size], v[size:]), lam, perm)
    return loss, losses2, v if criterion is not None else None


class ApplyStepper:
    """One optimisation step of the apply stage; also what ``scripts/bench_apply.py`` times.

    ``stats`` accumulates on the device (no ``.item()`` per step): loss sum, weight sum, correct, count,
    weights of clean and noisy samples when the ground truth is known.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 criterion: Criterion | None = None, amp_dtype: torch.dtype | None = None,
                 scaler: torch.amp.GradScaler | None = None, soft: SoftLabelState | None = None,
                 is_clean: torch.Tensor | None = None, ctx: DistributedContext | None = None) -> None:
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.device = next(model.parameters()).device
        self.amp_dtype, self.scaler, self.soft, self.is_clean = amp_dtype, scaler, soft, is_clean
        self.ctx = ctx
        self.num_updates = 0
        self.observe_unweighted = False  # warm-up epochs of an auto warm-up: record what the net *would* give
        self.observe_trust = False  # the trust check's epoch: the net's raw weights per class (a CMWLoss only)
        self.reset_stats()

    def reset_stats(self) -> None:
        # loss*n, correct, n, sum w, sum w*clean, clean, sum w*noisy, sum would-be w
        self.stats = torch.zeros(8, dtype=torch.float64, device=self.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weighted: bool) -> torch.Tensor:
        if self.soft is not None and weighted:
            return self._soft_step(x, y, idx)
        self.model.train()
        with autocast(self.device, self.amp_dtype):
            logits, extra = self._forward(x, y)
        loss, losses, w = weighted_ce(logits, y, self.criterion, weighted, idx)
        if extra is not None:  # an unweighted auxiliary loss (OLTR's centroid loss)
            loss = loss + extra
        self._backward_and_step(loss)
        if self.soft is not None:  # warm-up epochs of SL mode: the teacher follows from the start
            self.soft.teacher.update(unwrap(self.model))
        if w is not None:
            self._guard(losses, w, y)
        elif self.observe_unweighted and self.criterion is not None:
            self.stats[7] += self.criterion.weights(losses.detach(), y).double().sum()
        if self.observe_trust and isinstance(self.criterion, CMWLoss):
            self.criterion.observe_raw(losses.detach(), y)
        self._record(loss, logits, y, idx, w)
        return loss.detach()

    @torch.no_grad()
    def _guard(self, losses: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        """What the criterion did this step, for its monitors (a frozen net's guards: range, per-class weight,
        weight-loss trend; nothing for a fixed weighting)."""
        assert self.criterion is not None
        self.criterion.observe(losses, w, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and an auxiliary loss added unweighted (None here; subclasses add one)."""
        return self.model(x), None

    def _soft_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        soft = self.soft
        assert soft is not None
        pseudo = soft.update_pseudo(idx, teacher_probs(soft.teacher, x), self.ctx)
        lam, perm = sample_mixup(x.shape[0], soft.alpha, soft.rng, x.device)
        self.model.train()
        with autocast(self.device, self.amp_dtype):
            logits = self.model(mix_inputs(x, lam, perm))
        loss, losses2, w2 = soft_label_objective(logits, y, pseudo, self.criterion, lam, perm)
        self._backward_and_step(loss)
        soft.teacher.update(unwrap(self.model))
        size = y.shape[0]
        if w2 is not None:  # the net saw both mixup terms: the guards look at what it saw
            self._guard(losses2, w2, torch.cat([y, y[perm]]))
        self._record(loss, logits.float(), y, idx, None if w2 is None else w2[:size])
        return loss.detach()

    def null_step(self, shape: tuple[int, ...]) -> None:
        """Join the DDP all-reduce with zero gradients (a batch whose images were all unreadable).

        Eval mode keeps BatchNorm statistics untouched; DDP still syncs because grad mode is on.
        """
        self.model.eval()
        loss = self.model(torch.zeros(shape, device=self.device)).float().sum() * 0.0
        self._backward_and_step(loss)
        if self.soft is not None:
            self.soft.teacher.update(unwrap(self.model))

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)

    @torch.no_grad()
    def _record(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                w: torch.Tensor | None) -> None:
        n = y.shape[0]
        row = [loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
               torch.tensor(float(n), dtype=torch.float64, device=self.device)]
        if w is not None:
            row.append(w.double().sum())
            if self.is_clean is not None:
                clean = self.is_clean[idx].double()
                row += [(w.double() * clean).sum(), clean.sum(), (w.double() * (1 - clean)).sum()]
        self.stats[: len(row)] += torch.stack(row)

    def epoch_stats(self, ctx: DistributedContext) -> dict[str, Any]:
        """Train metrics of the epoch, reduced over ranks (one collective)."""
        s = ctx.all_reduce_sum(self.stats.cpu()).numpy()
        n = max(s[2], 1.0)
        out: dict[str, Any] = {"train_loss": s[0] / n, "train_acc": 100.0 * s[1] / n}
        if s[7] > 0:
            out["would_be_mean_weight"] = s[7] / n
        if s[3] > 0:
            out["mean_weight"] = s[3] / n
            if self.is_clean is not None:
                noisy = n - s[5]
                out["mean_weight_clean"] = s[4] / s[5] if s[5] else None
                out["mean_weight_noisy"] = s[6] / noisy if noisy else None
        return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


class SoftLabelState:
    """Teacher, pseudo-label bank and mixup stream of SL mode; the bank stays identical on every rank."""

    def __init__(self, model: nn.Module, targets: np.ndarray, num_classes: int, *, device: torch.device,
                 decay: float, alpha: float, batch_size: int) -> None:
        self.teacher = make_teacher(model, decay)
        self.bank = PseudoLabelBank(targets, num_classes, device=device)
        self.alpha = alpha
        self.batch_size = batch_size
        self.rng = np.random.default_rng(0)

    def update_pseudo(self, idx: torch.Tensor, probs: torch.Tensor, ctx: DistributedContext | None) -> torch.Tensor:
        rows = self.bank.blend(idx, probs)
        if ctx is None or not ctx.enabled:
            self.bank.write(idx, rows)
            return rows
        # every rank writes every rank's rows, padded to the loader's batch size so shapes agree
        size = self.batch_size
        pad_idx = torch.full((size,), -1, dtype=torch.long, device=rows.device)
        pad_rows = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=rows.device)
        pad_idx[: idx.shape[0]] = idx.to(rows.device)
        pad_rows[: idx.shape[0]] = rows
        all_idx = [torch.empty_like(pad_idx) for _ in range(ctx.world_size)]
        all_rows = [torch.empty_like(pad_rows) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(all_idx, pad_idx)
        torch.distributed.all_gather(all_rows, pad_rows)
        gi, gr = torch.cat(all_idx), torch.cat(all_rows)
        keep = gi >= 0
        self.bank.write(gi[keep], gr[keep])
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.module.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.module.load_state_dict(state["teacher"])
        self.bank.load_state_dict(state["bank"])


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model



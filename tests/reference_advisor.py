"""A deep-copy oracle of the advisor's meta step, written the way MW-Net-style code does it (a test oracle).

Per meta step: a deep copy of the classifier is run in train mode on the training batch; phase 1 takes the plain
CE of its pooled features (detached), the advisor sees the detached features and losses, the virtual loss is the
MES cross-entropy of the masked features; its gradient is taken with ``create_graph=True`` and written into the
copy as non-leaf tensors (``w - lr * g``, the ``update_params`` trick); the copy's plain forward on the meta batch
gives the meta CE, backpropagated to the advisor. Nothing of :mod:`cmw_transfer.trainer.meta.advisor` is used.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def mes_ce(logits: torch.Tensor, y: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
    """EQL softmax written out: ``-z_y + log sum_k w_k e^{z_k}``, ``w_k = 1 - suppress_k (1 - y_k)``."""
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    w = 1.0 - suppress * (1.0 - onehot)
    return -(logits * onehot).sum(1) + torch.log((w * torch.exp(logits)).sum(1))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
    del module._parameters[leaf]
    setattr(module, leaf, value)


def deepcopy_advisor_meta_gradient(model: nn.Module, advisor: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                   beta: torch.Tensor, meta_x: torch.Tensor, meta_y: torch.Tensor, lr: float
                                   ) -> dict[str, torch.Tensor]:
    """dL_meta/dtheta for a plain-SGD virtual step of every classifier parameter."""
    fresh = copy.deepcopy(model)
    fresh.train()
    f = fresh.forward_head(fresh.forward_features(x), pre_logits=True)
    fc = fresh.get_classifier()
    plain = F.cross_entropy(fc(f), y, reduction="none").detach()
    mask, s = advisor(f.detach(), plain)
    masked = f if mask is None else mask * f
    logits = fc(masked)
    losses = F.cross_entropy(logits, y, reduction="none") if s is None else mes_ce(logits, y, beta * s)
    named = list(fresh.named_parameters())
    grads = torch.autograd.grad(losses.mean(), [p for _, p in named], create_graph=True)
    for (name, p), g in zip(named, grads):
        _set_tensor(fresh, name, p - lr * g)
    meta_loss = F.cross_entropy(fresh(meta_x), meta_y)
    params = dict(advisor.named_parameters())
    out = torch.autograd.grad(meta_loss, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), out)}

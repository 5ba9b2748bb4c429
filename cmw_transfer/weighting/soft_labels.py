"""CMW-Net-SL machinery: pseudo-label bank, EMA teacher, mixup and the soft-label loss.

The authors' actual step (``mwn.py`` and ``trans_webvision.py``), per sample ``i`` with mixup partner
``b = perm[i]`` and ``lam = max(l, 1 - l)``, ``l ~ Beta(alpha, alpha)``::

    lam     * [CE(z, y_a) * v_a + CE(z, p_a) * (1 - v_a)]
  + (1-lam) * [CE(z, y_b) * v_b + CE(z, p_b) * (1 - v_b)]

``z`` are the logits of the mixed input, ``v_a = V(CE(z, y_a).detach(), family[y_a])`` and ``v_b`` likewise with
``y_b``; ``p`` are the soft pseudo-labels. The weight interpolates between trusting the given label and trusting
the teacher, which is why the net's output is used as ``v`` and ``1 - v`` rather than only as a multiplier.

Everything is vectorised (no per-sample Python loop) and the loss is a pure function, so the meta-train stage can
call it with weights that stay in the meta-graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from timm.utils import ModelEmaV3
from torch import nn

from cmw_transfer.defaults import MIXUP_ALPHA, TEACHER_DECAY

PSEUDO_MOMENTUM = 0.9  # p <- 0.9 p + 0.1 softmax(teacher)

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-sum_c p_c log softmax(z)_c``."""
    return -(target_probs.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1)


def soft_label_terms(logits: torch.Tensor, targets: torch.Tensor, pseudo: torch.Tensor,
                     perm: torch.Tensor) -> torch.Tensor:
    """Per-sample ``[CE(z, y_a), CE(z, p_a), CE(z, y_b), CE(z, p_b)]``, shape [B, 4] (b = the mixup partner)."""
    return torch.stack([
        F.cross_entropy(logits, targets, reduction="none"),
        soft_cross_entropy(logits, pseudo),
        F.cross_entropy(logits, targets[perm], reduction="none"),
        soft_cross_entropy(logits, pseudo[perm]),
    ], dim=1)


def soft_label_coefficients(v_a: torch.Tensor, v_b: torch.Tensor, lam: float) -> torch.Tensor:
    """How the weights mix the four terms: ``[lam v_a, lam (1-v_a), (1-lam) v_b, (1-lam) (1-v_b)]``, [B, 4]."""
    return torch.stack([lam * v_a, lam * (1 - v_a), (1 - lam) * v_b, (1 - lam) * (1 - v_b)], dim=1)


def soft_label_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pseudo: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    lam: float,
    perm: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """The CMW-Net-SL loss of a mixed batch.

    ``logits`` [B, C] of the mixed input; ``targets`` [B] observed labels and ``pseudo`` [B, C] pseudo-labels, both
    in the un-permuted order; ``weights = (v_a, v_b)``, each [B], the net's weights for ``targets`` and for
    ``targets[perm]`` (see :func:`mixup_weights`); ``lam`` and ``perm`` from :func:`sample_mixup`. The weights are
    used as given: detach them for the actual step, keep them in the graph for a meta step.
    """
    v_a, v_b = (w.reshape(-1).to(logits.dtype) for w in weights)
    per_sample = (soft_label_coefficients(v_a, v_b, lam) * soft_label_terms(logits, targets, pseudo, perm)).sum(1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction '{reduction}', expected mean, sum or none")


def mixup_weights(weight_fn: WeightFn, logits: torch.Tensor, targets: torch.Tensor,
                  perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v_a, v_b)``: the weighting net on the detached CE of the mixed logits against both label sets.

    ``weight_fn(losses, labels)`` is e.g. :meth:`cmw_transfer.weighting.CMWLoss.weights`. One batched call for both
    label sets, so the frozen net costs one tiny forward per step. The partner's loss is ``CE(z_i, y_perm[i])`` - the
    loss the partner term actually pays - not ``CE(z_perm[i], y_perm[i])`` (the authors' feature-independent script
    mixes the two up).
    """
    with torch.no_grad():
        labels, losses = mixup_losses(logits, targets, perm)
        v = weight_fn(losses, labels)
    size = targets.shape[0]
    return v[:size], v[size:]


@torch.no_grad()
def mixup_losses(logits: torch.Tensor, targets: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, losses)`` of length 2B: detached ``CE(z, y)`` then ``CE(z, y[perm])``, the weighting net's input."""
    labels = torch.cat([targets, targets[perm]])
    z = logits.detach().float()
    return labels, F.cross_entropy(torch.cat([z, z]), labels, reduction="none")


def sample_mixup(batch_size: int, alpha: float, rng: np.random.Generator,
                 device: torch.device | str = "cpu") -> tuple[float, torch.Tensor]:
    """``(lam, perm)`` with ``lam = max(l, 1 - l)``, ``l ~ Beta(alpha, alpha)``: the mixed input stays closer to
    the sample whose label and pseudo-label are updated. ``alpha <= 0`` disables mixup (``lam = 1``)."""
    lam = 1.0 if alpha <= 0 else float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.from_numpy(rng.permutation(batch_size)).to(device)
    return lam, perm


def mix_inputs(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    return x.mul(lam).add_(x[perm], alpha=1.0 - lam)


class PseudoLabelBank:
    """One soft label per training sample, initialised one-hot from the observed labels (as ``trans_webvision``).

    ``update(indices, teacher_probs)`` applies ``p <- m p + (1 - m) q`` and returns the new rows, which the step
    then uses. Stored on ``device`` in ``dtype`` (float16 halves the ``N x C`` memory for large targets).
    """

    def __init__(self, targets: np.ndarray | torch.Tensor, num_classes: int, *, momentum: float = PSEUDO_MOMENTUM,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
        self.momentum = float(momentum)
        self.probs = F.one_hot(labels, num_classes).to(dtype)

    def __len__(self) -> int:
        return self.probs.shape[0]

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.probs[indices.to(self.probs.device)].float()

    @torch.no_grad()
    def blend(self, indices: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """The updated rows, without writing them (DDP gathers them from every rank first)."""
        old = self[indices].to(teacher_probs.device)
        return old.mul_(self.momentum).add_(teacher_probs.float(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def write(self, indices: torch.Tensor, rows: torch.Tensor) -> None:
        self.probs[indices.to(self.probs.device)] = rows.to(self.probs.device, self.probs.dtype)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        rows = self.blend(indices, teacher_probs)
        self.write(indices, rows)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"probs": self.probs.cpu(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["probs"].shape) != tuple(self.probs.shape):
            raise ValueError(f"pseudo-label bank shape {tuple(state['probs'].shape)} != {tuple(self.probs.shape)}")
        self.probs.copy_(state["probs"].to(self.probs.device, self.probs.dtype))
        self.momentum = float(state["momentum"])


def make_teacher(model: nn.Module, decay: float = TEACHER_DECAY) -> ModelEmaV3:
    """EMA teacher on parameters (buffers copied), in eval mode; pass the unwrapped model, not the DDP wrapper."""
    return ModelEmaV3(model, decay=decay, exclude_buffers=True)


@torch.no_grad()
def teacher_probs(teacher: ModelEmaV3, x: torch.Tensor) -> torch.Tensor:
    """Softmax of the EMA teacher on the un-mixed batch."""
    teacher.module.eval()
    return F.softmax(teacher.module(x).float(), dim=1)


class SoftLabelCMWLoss(nn.Module):
    """The SL criterion for your own loop: mixup + pseudo-labels + frozen-net weights in one object.

    ``weight_fn(losses, labels)`` gives per-sample weights (``CMWLoss(...).weights``; ``None`` = all ones, the plain
    mixup baseline). Per step: ``lam, perm = crit.mix(x)`` -> ``logits = model(x_mixed)`` ->
    ``crit(logits, y, pseudo_rows, lam, perm)``.
    """

    def __init__(self, weight_fn: WeightFn | None, alpha: float = MIXUP_ALPHA, seed: int = 0) -> None:
        super().__init__()
        self.weight_fn = weight_fn
        self.alpha = float(alpha)
        self.rng = np.random.default_rng(seed)

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
        lam, perm = sample_mixup(x.shape[0], self.alpha, self.rng, x.device)
        return mix_inputs(x, lam, perm), lam, perm

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, pseudo: torch.Tensor, lam: float,
                perm: torch.Tensor) -> torch.Tensor:
        if self.weight_fn is None:
            ones = torch.ones(targets.shape[0], device=logits.device)
            weights = (ones, ones)
        else:
            weights = mixup_weights(self.weight_fn, logits, targets, perm)
        return soft_label_loss(logits, targets, pseudo, weights, lam, perm)

"""The textbook meta-gradient (deep copy + create_graph): slow, but obviously right; the tests' oracle."""

import copy

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from cmw_transfer.trainer.meta.objectives import SoftLabelCE, TrainBatch, WeightedCE


def _clone(buffers):
    return {k: b.clone() for k, b in buffers.items()}


def naive_meta_gradient(model: nn.Module, wnet: nn.Module, batch: TrainBatch, meta_x: torch.Tensor,
                        meta_y: torch.Tensor, objective: WeightedCE | SoftLabelCE, lr: float
                        ) -> dict[str, torch.Tensor]:
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    buffers = _clone(dict(clone.named_buffers()))
    logits = functional_call(clone, (params, buffers), (batch.x,))
    terms = objective.terms(logits, batch)
    coeff = objective.coefficients(lambda loss, fam: wnet(loss, fam), terms.detach(), batch)
    grads = torch.autograd.grad((coeff * terms).sum(), list(params.values()), create_graph=True)
    fast = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    meta_loss = F.cross_entropy(functional_call(clone, (fast, _clone(buffers)), (meta_x,)), meta_y)
    return dict(zip(dict(wnet.named_parameters()), torch.autograd.grad(meta_loss, list(wnet.parameters()))))

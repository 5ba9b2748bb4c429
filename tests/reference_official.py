"""The authors' MW-Net / CMW-Net training step, step for step as their released code runs it (a test oracle).

Written from the description of the official code (MW-Net ``MW-Net.py``, CMW-Net ``section4/.../mwn.py``), not
copied. Per meta step: a **fresh** classifier is built and given the real one's ``state_dict``; it is run in train
mode on the training batch (BatchNorm uses batch statistics and updates only the throw-away copy's running
statistics); the weighting net sees the **detached** per-sample losses; the virtual update is plain SGD at the
classifier's lr, written into the copy as non-leaf tensors (the ``MetaModule.update_params`` trick); the meta CE
of the copy at the virtual weights is backpropagated to the weighting net, which then steps. The actual step is a
second forward of the real model at the updated weighting net (the paper's order).

The weighting nets keep the authors' layouts and per-sample head loop: MW-Net's ``VNet(1, H, 1)`` (``linear1``,
``linear2``) and CMW-Net's ``ACVNet(1, H, H, 1, K)`` (``feature.layer``, ``classfier.layers[k]``), so a test also
checks that the toolkit's gathered heads compute the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cmw_transfer.artifact.net import CMWNet


class AuthorsVNet(nn.Module):
    """MW-Net's weighting net: Linear(1, H) - ReLU - Linear(H, 1) - Sigmoid, on a [B, 1] loss column."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, hidden)
        self.linear2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, num: torch.Tensor | None = None, c: list[int] | None = None) -> torch.Tensor:
        return torch.sigmoid(self.linear2(F.relu(self.linear1(x))))


class _Share(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _Task(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) for _ in range(heads))

    def forward(self, x: torch.Tensor, num: torch.Tensor, c: list[int]) -> torch.Tensor:
        out = [self.layers[c[int(num[i])]](x[i].unsqueeze(0)) for i in range(x.shape[0])]  # one head per sample
        return torch.cat(out, 0)


class AuthorsACVNet(nn.Module):
    """CMW-Net's weighting net: shared Linear(1, H)+ReLU, K heads Linear(H, 1)+Sigmoid, picked by ``c[label]``."""

    def __init__(self, hidden: int = 100, heads: int = 3) -> None:
        super().__init__()
        self.feature = _Share(hidden)
        self.classfier = _Task(hidden, heads)  # the authors' spelling

    def forward(self, x: torch.Tensor, num: torch.Tensor, c: list[int]) -> torch.Tensor:
        return self.classfier(self.feature(x), num, c)


def authors_net_like(net: CMWNet) -> nn.Module:
    """The authors' layout holding exactly ``net``'s function (VNet for K=1, ACVNet otherwise)."""
    with torch.no_grad():
        if net.num_heads == 1:
            out = AuthorsVNet(net.hidden_size).to(net.trunk.weight.dtype)
            out.linear1.weight.copy_(net.trunk.weight)
            out.linear1.bias.copy_(net.trunk.bias)
            out.linear2.weight.copy_(net.heads.weight)
            out.linear2.bias.copy_(net.heads.bias)
            return out
        out = AuthorsACVNet(net.hidden_size, net.num_heads).to(net.trunk.weight.dtype)
        out.feature.layer[0].weight.copy_(net.trunk.weight)
        out.feature.layer[0].bias.copy_(net.trunk.bias)
        for k, head in enumerate(out.classfier.layers):
            head[0].weight.copy_(net.heads.weight[k:k + 1])
            head[0].bias.copy_(net.heads.bias[k:k + 1])
        return out


def authors_grads_as_cmwnet(vnet: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' net's ``.grad``s laid out as the toolkit's ``trunk`` / ``heads`` gradients."""
    if isinstance(vnet, AuthorsVNet):
        return {"trunk.weight": vnet.linear1.weight.grad, "trunk.bias": vnet.linear1.bias.grad,
                "heads.weight": vnet.linear2.weight.grad, "heads.bias": vnet.linear2.bias.grad}
    heads = [h[0] for h in vnet.classfier.layers]
    return {"trunk.weight": vnet.feature.layer[0].weight.grad, "trunk.bias": vnet.feature.layer[0].bias.grad,
            "heads.weight": torch.cat([h.weight.grad for h in heads]),
            "heads.bias": torch.cat([h.bias.grad for h in heads])}


@dataclass
class SoftLabels:
    """CMW-Net-SL state of a batch: soft pseudo-labels [B, C], the mixup coefficient and partner permutation."""

    pseudo: torch.Tensor
    lam: float
    idx: torch.Tensor


def _soft_ce(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(outputs, dim=1)).sum(1)


def authors_inner_loss(outputs: torch.Tensor, y: torch.Tensor, vnet: nn.Module, c: list[int],
                       soft: SoftLabels | None, *, detach_weights: bool) -> torch.Tensor:
    """MW-Net: ``sum(cost * v) / len(cost)``; CMW-Net-SL (``soft``): the mixup label / pseudo-label interpolation.

    The weighting net always sees ``cost.data``; ``detach_weights`` is the actual step's ``no_grad``.
    """
    ctx = torch.no_grad() if detach_weights else torch.enable_grad()
    if soft is None:
        cost = F.cross_entropy(outputs, y, reduction="none").reshape(-1, 1)
        with ctx:
            v = vnet(cost.data, y, c)
        return torch.sum(cost * v) / len(cost)
    y_b = y[soft.idx]
    cost_1 = F.cross_entropy(outputs, y, reduction="none").reshape(-1, 1)
    cost_2 = F.cross_entropy(outputs, y_b, reduction="none").reshape(-1, 1)
    with ctx:
        v1 = vnet(cost_1.data, y, c)
        v2 = vnet(cost_2.data, y_b, c)
    pa = _soft_ce(outputs, soft.pseudo).reshape(-1, 1)
    pb = _soft_ce(outputs, soft.pseudo[soft.idx]).reshape(-1, 1)
    lam = soft.lam
    return torch.mean(lam * (cost_1 * v1 + pa * (1 - v1)) + (1 - lam) * (cost_2 * v2 + pb * (1 - v2)))


def _update_params(module: nn.Module, grads: dict[str, torch.Tensor], lr: float) -> None:
    """``MetaModule.update_params``: ``w <- w - lr * g`` written into the copy as non-leaf tensors."""
    for name, g in grads.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = owner._parameters[leaf] - lr * g


def official_meta_step(build_model: Callable[[], nn.Module], model: nn.Module, vnet: nn.Module, x: torch.Tensor,
                       y: torch.Tensor, c: list[int], x_meta: torch.Tensor, y_meta: torch.Tensor, meta_lr: float,
                       soft: SoftLabels | None = None) -> torch.Tensor:
    """One meta step; leaves the weighting net's gradient in its ``.grad`` and returns the meta loss."""
    meta_model = build_model().to(device=x.device, dtype=x.dtype)
    meta_model.load_state_dict(model.state_dict())
    meta_model.train()
    outputs = meta_model(x)
    l_f_meta = authors_inner_loss(outputs, y, vnet, c, soft, detach_weights=False)
    named = list(meta_model.named_parameters())
    grads = torch.autograd.grad(l_f_meta, [p for _, p in named], create_graph=True)
    _update_params(meta_model, {n: g for (n, _), g in zip(named, grads)}, meta_lr)
    l_g_meta = F.cross_entropy(meta_model(x_meta), y_meta)
    vnet.zero_grad()
    l_g_meta.backward()
    return l_g_meta.detach()


def official_iteration(build_model: Callable[[], nn.Module], model: nn.Module, vnet: nn.Module,
                       optimizer: torch.optim.Optimizer, optimizer_vnet: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor, c: list[int], x_meta: torch.Tensor, y_meta: torch.Tensor,
                       soft: SoftLabels | None = None) -> None:
    """A full iteration: meta step at the optimizer's current lr, weighting-net step, then the actual step."""
    meta_lr = optimizer.param_groups[0]["lr"]
    official_meta_step(build_model, model, vnet, x, y, c, x_meta, y_meta, meta_lr, soft)
    optimizer_vnet.step()
    outputs = model(x)
    loss = authors_inner_loss(outputs, y, vnet, c, soft, detach_weights=True)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

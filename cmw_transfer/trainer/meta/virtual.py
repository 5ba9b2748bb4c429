"""The virtual step of a meta-iteration: which tensors it updates (``exact``, ``skip:N``, ``famus``), by which rule
(plain SGD as the paper, or the real optimizer mirrored), and FaMUS's layer gates with their gradient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cmw_transfer.errors import UserError
from cmw_transfer.models import parameter_stages
from cmw_transfer.trainer.config import parse_meta_grad

try:
    from timm.optim import SGDW as _SGDW
except ImportError:  # older timm
    _SGDW = None

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class VirtualStep:
    """One optimizer step as a function of the gradient: plain SGD by default (as the paper), or SGD with the
    momentum / Nesterov / dampening / (coupled or decoupled) weight decay of a real optimizer's param group."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    decoupled_weight_decay: bool = False

    @property
    def grad_scale(self) -> float:
        """``slope`` of a first step (no momentum buffer yet)."""
        return self.slope(has_buffer=False)

    def slope(self, has_buffer: bool) -> float:
        """``-d w_hat / d g / lr``: the step is affine in the gradient, this is its (scalar) slope."""
        if not self.momentum:
            return 1.0
        into_buffer = 1.0 - self.dampening if has_buffer else 1.0
        return 1.0 + self.momentum * into_buffer if self.nesterov else into_buffer

    def apply(self, w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        """``w_hat`` exactly as ``torch.optim.SGD`` (or timm's ``SGDW`` when decoupled) would step ``w``."""
        coupled = self.weight_decay and not self.decoupled_weight_decay
        d = g + self.weight_decay * w if coupled else g
        if self.momentum:
            d_buf = d if buf is None else self.momentum * buf + (1.0 - self.dampening) * d
            d = d + self.momentum * d_buf if self.nesterov else d_buf
        if self.weight_decay and self.decoupled_weight_decay:
            w = w * (1.0 - self.lr * self.weight_decay)
        return w - self.lr * d


StepSpec = VirtualStep | Mapping[str, VirtualStep]  # one step for every parameter, or one per parameter name


def virtual_step_from_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]
                                ) -> tuple[dict[str, VirtualStep], Params]:
    """The next step of the optimizer actually built, per parameter name, plus its momentum buffers.

    Reads every param group (lr as scheduled now, momentum, dampening, Nesterov, weight decay: timm's
    ``create_optimizer_v2`` puts biases and normalisation parameters in a no-decay group), so the virtual step is
    the real one. Parameters the optimizer does not hold get ``lr=0`` (the real step leaves them too). Mirrors
    ``torch.optim.SGD`` and timm's ``SGDW``; any other optimizer is a user error.
    """
    decoupled = _mirrorable(optimizer)
    name_of = {id(p): n for n, p in params.items()}
    steps: dict[str, VirtualStep] = {n: VirtualStep(0.0) for n in params}
    buffers: Params = {}
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise UserError("--mirror-optimizer: an optimizer with maximize=True cannot be mirrored")
        step = VirtualStep(float(group["lr"]), float(group.get("momentum", 0.0)),
                           float(group.get("weight_decay", 0.0)), bool(group.get("nesterov", False)),
                           float(group.get("dampening", 0.0)), decoupled)
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None:
                continue
            steps[name] = step
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if step.momentum and buf is not None:
                buffers[name] = buf
    return steps, buffers


def _mirrorable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether weight decay is decoupled; a user error for an optimizer whose step is not mirrored exactly."""
    if type(optimizer) is torch.optim.SGD:
        return False
    plain_sgdw = not any(g.get("caution") or g.get("corrected_weight_decay") for g in optimizer.param_groups)
    if _SGDW is not None and type(optimizer) is _SGDW and plain_sgdw:
        return True
    raise UserError(f"--mirror-optimizer cannot mirror {type(optimizer).__name__}: only SGD (momentum, Nesterov, "
                    "dampening, per-group weight decay) and timm's SGDW are mirrored; drop --mirror-optimizer to "
                    "use the paper's plain-SGD virtual step")


def _steps_for(step: StepSpec, names: list[str]) -> dict[str, VirtualStep]:
    return {n: step for n in names} if isinstance(step, VirtualStep) else {n: step[n] for n in names}


def virtual_names(model: nn.Module, mode: str, skip: int = 0, famus_stages: int = 1) -> list[str]:
    """Parameters that get a virtual update with a second-order path, bottom to top."""
    stages = parameter_stages(model)
    if mode == "exact":
        keep = stages
    elif mode == "skip":
        if not 0 <= skip < len(stages):
            raise ValueError(f"skip:{skip} leaves no stage to update; this model has {len(stages)} stages")
        keep = stages[skip:]
    else:  # famus: candidates are the top stage(s) below the classifier, plus the classifier
        keep = stages[-(famus_stages + 1):]
    return [name for stage in keep for name in stage]


def meta_gradient_mode(model: nn.Module, spec: str, famus_active: int = 4, device: torch.device | str = "cpu"
                       ) -> tuple[list[str], FamusGates | None]:
    """``--meta-grad SPEC``: the virtually updated parameters, and for ``famus`` the layer gates (else None)."""
    mode, skip = parse_meta_grad(spec)
    try:
        virtual = virtual_names(model, mode, skip)
    except ValueError as exc:
        raise UserError(f"--meta-grad {spec}: {exc}") from None
    if mode != "famus":
        return virtual, None
    params = dict(model.named_parameters())
    head = [n for n in virtual if n.startswith(_classifier_prefix(model))]
    return virtual, FamusGates({n: params[n].shape for n in virtual}, always_on=head,
                               target_active=famus_active).to(device)


def _classifier_prefix(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return list(dict(model.named_parameters()))[-1].rsplit(".", 1)[0]


class FamusGates(nn.Module):
    """FaMUS layer samplers: per candidate tensor, an MLP on its pooled virtual gradient -> hard Gumbel on/off.

    The classifier (last stage) is always on. The count penalty ``(sum r - K)^2`` keeps about K tensors active.
    """

    def __init__(self, shapes: dict[str, torch.Size], always_on: list[str], hidden: int = 128,
                 target_active: int = 4, tau: float = 5.0) -> None:
        super().__init__()
        self.names = [n for n in shapes if n not in always_on]
        self.always_on = list(always_on)
        self.samplers = nn.ModuleList(
            nn.Sequential(nn.Linear(shapes[n][0], hidden), nn.PReLU(), nn.Linear(hidden, 2)) for n in self.names)
        self.target_active = target_active
        self.tau = tau

    @staticmethod
    def pooled(g: torch.Tensor) -> torch.Tensor:
        """Average over every dim but the output one, standardised (the FaMUS sampler input)."""
        v = g.reshape(g.shape[0], -1).mean(dim=1) if g.dim() > 1 else g
        return (v - v.mean()) / (v.std() + 1e-8) if v.numel() > 1 else v

    def forward(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gates = {n: torch.ones((), device=grads[n].device) for n in self.always_on}
        for name, sampler in zip(self.names, self.samplers):
            logits = sampler(self.pooled(grads[name].detach()))
            gates[name] = F.gumbel_softmax(logits, tau=self.tau, hard=True)[0]
        return gates

    def count_penalty(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        active = torch.stack([gates[n] for n in self.names]).sum() if self.names else torch.zeros(())
        return (active - self.target_active) ** 2


def virtual_weights(leaves: Params, grad_of: Params, step: StepSpec, names: list[str],
                    momentum_buffers: Params | None = None) -> tuple[Params, dict[str, float]]:
    """The virtually updated weights (leaves for the meta loss) and each virtual tensor's slope ``lr * s``."""
    steps = _steps_for(step, names)
    buffers_of = momentum_buffers or {}
    scale = {n: steps[n].lr * steps[n].slope(buffers_of.get(n) is not None) for n in names}
    fast: Params = {}
    for name, p in leaves.items():
        if name in grad_of:
            fast[name] = steps[name].apply(p.detach(), grad_of[name], buffers_of.get(name)).requires_grad_(True)
        else:
            fast[name] = p.detach()
    return fast, scale


def _gate_gradients(gates: FamusGates, gate_values: dict[str, torch.Tensor], names: list[str],
                    g_meta: list[torch.Tensor], grad_of: Params, active: list[str], scale: dict[str, float]
                    ) -> dict[str, torch.Tensor]:
    """FaMUS sampler gradients: dL_meta/dr_l through the straight-through update plus the count penalty.

    A fired gate scales ``g_l`` in ``w_hat_l = w_l - lr * r_l * g_l`` (``dL/dr_l = -lr s g_meta_l . g_l``); an off
    gate scales the detached ``(1 - r_l) g_l`` (the opposite sign), as in the FaMUS code.
    """
    if not gates.names:
        return {}
    surrogate = gates.count_penalty(gate_values) * 0.1
    for name, gm in zip(names, g_meta):
        if name in gates.names:
            sign = 1.0 if name in active else -1.0
            slope = (-scale[name] * (gm * grad_of[name]).sum()).detach()
            surrogate = surrogate + sign * slope * gate_values[name]
    params = dict(gates.named_parameters())
    grads = torch.autograd.grad(surrogate, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}

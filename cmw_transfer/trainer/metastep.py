"""The bi-level meta-step as a function of (params, buffers, batch) built on ``torch.func.functional_call``.

The virtual step is affine in the weighted training gradient, ``w_hat_p = a_p - lr_p * s_p * sum_{i,t} c_{i,t}(theta)
grad_p l_{i,t}(w)`` per tensor ``p`` (plain SGD: ``a = w``, ``s = 1``; a mirrored SGD adds the momentum buffer and
weight decay to ``a`` and ``s`` = 1 + momentum under Nesterov), so by the chain rule the meta-gradient is

    dL_meta/dtheta = -sum_{i,t} (sum_p lr_p s_p g_meta_p . grad_p l_{i,t}) * dc_{i,t}/dtheta,  g_meta = dL_meta/dw_hat

which this module computes *exactly* from first-order pieces: the meta loss is differentiated only to the virtual
weights, and the per-term directional derivatives come from one dual (forward-mode) forward of the training batch
(``exact``; :mod:`cmw_transfer.trainer.dual_forward` fuses its convolution and BatchNorm tangents) or from a
reverse-over-reverse pass on the kept training graph restricted to the top layers (``skip:N``, ``famus``). Nothing
is deep-copied, and the training forward is shared with the real ("actual") step. It equals the authors' literal
MW-Net / CMW-Net step (fresh model, ``create_graph``) to rounding; see ``docs/metastep.md``.

Meta-gradient modes: ``exact`` (every parameter is virtually updated), ``skip:N`` (SLMO: the bottom N stages are
not virtually updated, so neither the meta backward nor the second-order pass goes below them) and ``famus``
(learned Gumbel gates pick which top-stage tensors carry the second-order path; see :class:`FamusGates`).
BatchNorm running statistics are never touched by the virtual or meta passes (they run on cloned buffers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from cmw_transfer.errors import UserError
from cmw_transfer.models import parameter_stages
from cmw_transfer.trainer.dual_forward import FusedTangents
from cmw_transfer.trainer.objectives import SoftLabelCE, TrainBatch, WeightedCE

try:
    from timm.optim import SGDW as _SGDW
except ImportError:  # older timm
    _SGDW = None

Params = dict[str, torch.Tensor]
CHANNELS_LAST_ON_CPU = True  # the dual forward runs channels-last on CPU (measured faster there)


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


def parse_meta_grad(spec: str) -> tuple[str, int]:
    """``exact`` -> ("exact", 0); ``skip:N`` -> ("skip", N); ``famus`` -> ("famus", 0)."""
    if spec in ("exact", "famus"):
        return spec, 0
    if spec.startswith("skip:") and re.fullmatch("[0-9]{1,4}", spec[5:]):  # ASCII digits: int() reads any script's
        return "skip", int(spec[5:])
    raise ValueError(f"--meta-grad must be exact, skip:N or famus (N: digits 0-9), got {spec!r}")


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


@dataclass
class MetaResult:
    """Gradients for the weighting net (and FaMUS samplers), plus what the actual step can reuse."""

    wnet_grads: dict[str, torch.Tensor]
    meta_loss: float
    train_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # sum c(theta_t) grad l, every parameter
    gate_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def _clone(buffers: Params) -> Params:
    return {k: b.clone() for k, b in buffers.items()}


def reverse_directional_derivatives(terms: torch.Tensor, params: list[torch.Tensor], tangents: list[torch.Tensor]
                                    ) -> torch.Tensor:
    """``d[i, t] = tangent . grad_params l[i, t]`` by reverse-over-reverse on the kept training graph.

    Cheap when ``params`` are the top layers only (skip:N, FaMUS): both passes stop at the lowest of them.
    """
    u = torch.ones_like(terms, requires_grad=True)
    grads = torch.autograd.grad((u * terms).sum(), params, create_graph=True, retain_graph=True,
                                allow_unused=True)
    dot = sum((g * t).sum() for g, t in zip(grads, tangents) if g is not None)
    if not torch.is_tensor(dot) or not dot.requires_grad:
        return torch.zeros_like(terms)
    return torch.autograd.grad(dot, u, retain_graph=True)[0]


def forward_directional_derivatives(model: nn.Module, params: Params, buffers: Params, batch: TrainBatch,
                                    objective: WeightedCE | SoftLabelCE, names: list[str],
                                    tangents: list[torch.Tensor], *, fused: bool = True) -> torch.Tensor:
    """The same quantity by forward-mode AD: one dual forward, no second-order graph.

    Used for ``exact``: it needs no retained training graph, so the meta-iteration's peak memory stays near the
    larger of one training and one meta step. ``fused`` (default) runs it under
    :class:`~cmw_transfer.trainer.dual_forward.FusedTangents` (one tangent conv per conv, closed-form BatchNorm
    tangent), channels-last on CPU; ``fused=False`` is plain ``torch.func.jvp``, kept as the reference.
    """
    frozen = {k: p.detach() for k, p in params.items() if k not in names}
    if not fused:
        def terms_of(virtual: Params) -> torch.Tensor:
            logits = functional_call(model, ({**frozen, **virtual}, _clone(buffers)), (batch.x,))
            return objective.terms(logits, batch)

        primals = {n: params[n].detach() for n in names}
        return torch.func.jvp(terms_of, (primals,), (dict(zip(names, tangents)),))[1]
    x = batch.x
    if CHANNELS_LAST_ON_CPU and x.dim() == 4 and x.device.type == "cpu":  # faster CPU convs and BatchNorm
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fwad.dual_level(), FusedTangents():
        dual = {n: fwad.make_dual(params[n].detach(), t) for n, t in zip(names, tangents)}
        logits = functional_call(model, ({**frozen, **dual}, _clone(buffers)), (x,))
        terms = objective.terms(logits, batch)
        d = fwad.unpack_dual(terms).tangent
    return torch.zeros_like(terms) if d is None else d


def meta_gradient(
    model: nn.Module,
    wnet: nn.Module,
    params: Params,
    buffers: Params,
    batch: TrainBatch,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
    objective: WeightedCE | SoftLabelCE,
    step: StepSpec,
    names: list[str],
    *,
    momentum_buffers: Params | None = None,
    gates: FamusGates | None = None,
    wnet_params: Params | None = None,
    train_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    derivatives: str = "auto",
    keep_graph: bool = False,
) -> MetaResult:
    """Meta-gradient of the weighting net at ``params``; pure: ``params`` and ``buffers`` are not modified.

    ``names`` are the virtually updated parameters (see :func:`virtual_names`); ``step`` is one
    :class:`VirtualStep` for all of them or one per name (:func:`virtual_step_from_optimizer`), with
    ``momentum_buffers`` the optimizer's buffers by name. ``train_out`` lets a trainer pass
    the (logits, terms) of a training forward it already ran; ``result.train_grads`` then holds that batch's
    weighted gradient for every parameter, so an actual step at the current net needs no second backward.
    ``derivatives``: ``forward`` (the fused dual forward), ``jvp`` (plain ``torch.func.jvp``, the reference),
    ``reverse`` (on the kept graph) or ``auto`` (forward when every parameter is virtual, i.e. ``exact``; reverse
    for top-layer approximations). ``keep_graph`` leaves the training graph
    alive for a caller that backpropagates it again (the paper's order: actual step after the net update).
    """
    wnet_params = wnet_params if wnet_params is not None else dict(wnet.named_parameters())
    if train_out is None:
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
        logits = functional_call(model, (leaves, _clone(buffers)), (batch.x,))
        terms = objective.terms(logits, batch)
    else:
        leaves = params
        logits, terms = train_out
    if derivatives == "auto":
        derivatives = "forward" if len(names) == len(leaves) else "reverse"
    if derivatives not in ("forward", "reverse", "jvp"):
        raise ValueError(f"derivatives must be auto, forward, reverse or jvp, got '{derivatives}'")
    reverse = derivatives == "reverse"

    def weight_fn(loss: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        return functional_call(wnet, wnet_params, (loss, family))

    coeff = objective.coefficients(weight_fn, terms.detach(), batch)
    grad_names = list(leaves) if train_out is not None else names
    grads = torch.autograd.grad((coeff.detach() * terms).sum(), [leaves[n] for n in grad_names],
                                retain_graph=reverse or keep_graph, allow_unused=True)
    grad_all = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(grad_names, grads)}
    grad_of = {n: grad_all[n] for n in names}

    gate_values: dict[str, torch.Tensor] = {}
    if gates is not None:
        gate_values = gates(grad_of)
    # w_hat is affine in g with slope -lr * s per tensor, so dw_hat/dtheta folds into the tangents below
    fast, scale = virtual_weights(leaves, grad_of, step, names, momentum_buffers)
    meta_logits = functional_call(model, (fast, _clone(buffers)), (meta_x,))
    meta_loss = F.cross_entropy(meta_logits, meta_y)
    g_meta = torch.autograd.grad(meta_loss, [fast[n] for n in names], allow_unused=True)
    g_meta = [torch.zeros_like(fast[n]) if g is None else g for n, g in zip(names, g_meta)]

    result = MetaResult(wnet_grads={}, meta_loss=float(meta_loss.detach()))
    if train_out is not None:
        result.train_grads = grad_all
    tangents = g_meta
    if gates is not None:
        result.active = [n for n in names if float(gate_values[n].detach()) > 0.5]
        tangents = [g if n in result.active else torch.zeros_like(g) for n, g in zip(names, g_meta)]
        result.gate_grads = _gate_gradients(gates, gate_values, names, g_meta, grad_of, result.active, scale)
    common = set(scale.values())
    outer = common.pop() if len(common) == 1 else 1.0  # one step for all: scale d once instead of every tangent
    if outer == 1.0:
        tangents = [scale[n] * t for n, t in zip(names, tangents)]
    if reverse:
        d = reverse_directional_derivatives(terms, [leaves[n] for n in names], tangents)
    else:
        d = forward_directional_derivatives(model, leaves, buffers, batch, objective, names, tangents,
                                            fused=derivatives == "forward")
    surrogate = -outer * (coeff * d.detach()).sum()
    wgrads = torch.autograd.grad(surrogate, list(wnet_params.values()), allow_unused=True)
    result.wnet_grads = {k: torch.zeros_like(p) if g is None else g
                         for (k, p), g in zip(wnet_params.items(), wgrads)}
    return result


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

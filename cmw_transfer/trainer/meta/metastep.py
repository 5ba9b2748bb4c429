"""The bi-level meta-step as a function of (params, buffers, batch) built on ``torch.func.functional_call``.

The virtual step is affine in the weighted training gradient, ``w_hat_p = a_p - lr_p * s_p * sum_{i,t} c_{i,t}(theta)
grad_p l_{i,t}(w)`` per tensor ``p`` (plain SGD: ``a = w``, ``s = 1``; a mirrored SGD adds the momentum buffer and
weight decay to ``a`` and ``s`` = 1 + momentum under Nesterov), so by the chain rule the meta-gradient is

    dL_meta/dtheta = -sum_{i,t} (sum_p lr_p s_p g_meta_p . grad_p l_{i,t}) * dc_{i,t}/dtheta,  g_meta = dL_meta/dw_hat

which this module computes *exactly* from first-order pieces: the meta loss is differentiated only to the virtual
weights, and the per-term directional derivatives come from one dual (forward-mode) forward of the training batch
(``exact``; :mod:`cmw_transfer.trainer.meta.dual_forward` fuses its convolution and BatchNorm tangents) or from a
reverse-over-reverse pass on the kept training graph restricted to the top layers (``skip:N``, ``famus``). Nothing
is deep-copied, and the training forward is shared with the real ("actual") step. It equals the authors' literal
MW-Net / CMW-Net step (fresh model, ``create_graph``) to rounding; see ``docs/metastep.md``.

Meta-gradient modes: ``exact`` (every parameter is virtually updated), ``skip:N`` (SLMO: the bottom N stages are
not virtually updated, so neither the meta backward nor the second-order pass goes below them) and ``famus``
(learned Gumbel gates pick which top-stage tensors carry the second-order path; see :class:`FamusGates`).
BatchNorm running statistics are never touched by the virtual or meta passes (they run on cloned buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from cmw_transfer.trainer.meta.dual_forward import FusedTangents
from cmw_transfer.trainer.meta.objectives import SoftLabelCE, TrainBatch, WeightedCE
from cmw_transfer.trainer.meta.virtual import (
    FamusGates,
    Params,
    StepSpec,
    VirtualStep,
    _gate_gradients,
    meta_gradient_mode,
    virtual_names,
    virtual_step_from_optimizer,
    virtual_weights,
)

# the virtual step's names are part of this module's face (the meta-gradient's inputs)
__all__ = ["FamusGates", "MetaResult", "Params", "StepSpec", "VirtualStep", "VirtualUpdate", "clone_buffers",
           "forward_directional_derivatives", "meta_gradient", "meta_gradient_mode", "meta_step_core",
           "resolve_derivatives", "reverse_directional_derivatives", "virtual_names", "virtual_step_from_optimizer",
           "virtual_weights"]
CHANNELS_LAST_ON_CPU = True  # the dual forward runs channels-last on CPU (measured faster there)


@dataclass
class MetaResult:
    """Gradients for the weighting net (and FaMUS samplers), plus what the actual step can reuse."""

    wnet_grads: dict[str, torch.Tensor]
    meta_loss: float
    train_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # sum c(theta_t) grad l, every parameter
    gate_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def clone_buffers(buffers: Params) -> Params:
    """Fresh copies: a virtual or meta pass never moves the model's BatchNorm running statistics."""
    return {k: b.clone() for k, b in buffers.items()}


@dataclass(frozen=True)
class VirtualUpdate:
    """How the virtual step updates the classifier: the tensors (``names``), the step rule (one
    :class:`VirtualStep` or one per name), the optimizer's momentum buffers, FaMUS's gates."""

    names: list[str]
    step: StepSpec
    momentum_buffers: Params | None = None
    gates: FamusGates | None = None


# The derivative strategy of a meta-model: (dL_meta/dw_hat per virtual tensor, FaMUS-gated; each tensor's slope
# lr * s) -> a scalar whose gradient in the meta-model's parameters is its meta-gradient.
Surrogate = Callable[[list[torch.Tensor], dict[str, float]], torch.Tensor]


def meta_step_core(model: nn.Module, buffers: Params, leaves: Params, train_loss: torch.Tensor,
                   update: VirtualUpdate, meta_batch: tuple[torch.Tensor, torch.Tensor], meta_params: Params,
                   surrogate: Surrogate, *, all_grads: bool, retain: bool) -> MetaResult:
    """The skeleton every meta-gradient shares (weighting nets, CurveNet, advisors).

    The training gradient of ``train_loss`` (the meta-model's output detached in it) at ``leaves``; the virtual
    step (FaMUS's gates read that gradient); the meta loss of ``meta_batch`` at the virtual weights and its
    gradient there, gated; then ``surrogate`` turns that into the meta-model's gradient (``meta_params``).
    ``all_grads`` keeps every parameter's training gradient (``result.train_grads``, for an actual step that reuses
    it); ``retain`` keeps the training graph (a reverse-mode strategy, or an actual step that backpropagates it).
    """
    names = update.names
    grad_names = list(leaves) if all_grads else names
    grads = torch.autograd.grad(train_loss, [leaves[n] for n in grad_names], retain_graph=retain, allow_unused=True)
    grad_all = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(grad_names, grads)}
    grad_of = {n: grad_all[n] for n in names}
    gate_values = update.gates(grad_of) if update.gates is not None else {}
    # w_hat is affine in g with slope -lr * s per tensor, so dw_hat/dtheta folds into the strategy's tangents
    fast, scale = virtual_weights(leaves, grad_of, update.step, names, update.momentum_buffers)
    meta_x, meta_y = meta_batch
    meta_loss = F.cross_entropy(functional_call(model, (fast, clone_buffers(buffers)), (meta_x,)), meta_y)
    g_meta = torch.autograd.grad(meta_loss, [fast[n] for n in names], allow_unused=True)
    g_meta = [torch.zeros_like(fast[n]) if g is None else g for n, g in zip(names, g_meta)]
    result = MetaResult(wnet_grads={}, meta_loss=float(meta_loss.detach()), train_grads=grad_all if all_grads else {})
    if update.gates is not None:
        result.active = [n for n in names if float(gate_values[n].detach()) > 0.5]
        result.gate_grads = _gate_gradients(update.gates, gate_values, names, g_meta, grad_of, result.active, scale)
        g_meta = [g if n in result.active else torch.zeros_like(g) for n, g in zip(names, g_meta)]
    grads = torch.autograd.grad(surrogate(g_meta, scale), list(meta_params.values()), allow_unused=True)
    result.wnet_grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(meta_params.items(), grads)}
    return result


def resolve_derivatives(derivatives: str, names: list[str], leaves: Params) -> str:
    """``auto``: forward-mode when every parameter is virtual (``exact``), reverse for the top-layer cuts."""
    if derivatives == "auto":
        return "forward" if len(names) == len(leaves) else "reverse"
    return derivatives


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
    :class:`~cmw_transfer.trainer.meta.dual_forward.FusedTangents` (one tangent conv per conv, closed-form BatchNorm
    tangent), channels-last on CPU; ``fused=False`` is plain ``torch.func.jvp``, kept as the reference.
    """
    frozen = {k: p.detach() for k, p in params.items() if k not in names}
    if not fused:
        def terms_of(virtual: Params) -> torch.Tensor:
            logits = functional_call(model, ({**frozen, **virtual}, clone_buffers(buffers)), (batch.x,))
            return objective.terms(logits, batch)

        primals = {n: params[n].detach() for n in names}
        return torch.func.jvp(terms_of, (primals,), (dict(zip(names, tangents)),))[1]
    x = batch.x
    if CHANNELS_LAST_ON_CPU and x.dim() == 4 and x.device.type == "cpu":  # faster CPU convs and BatchNorm
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fwad.dual_level(), FusedTangents():
        dual = {n: fwad.make_dual(params[n].detach(), t) for n, t in zip(names, tangents)}
        logits = functional_call(model, ({**frozen, **dual}, clone_buffers(buffers)), (x,))
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

    Size: the pure function tests and benchmarks call, each argument one of its inputs; the work is in
    :func:`meta_step_core`, the per-sample derivatives in the strategy below.
    """
    wnet_params = wnet_params if wnet_params is not None else dict(wnet.named_parameters())
    if train_out is None:
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
        logits = functional_call(model, (leaves, clone_buffers(buffers)), (batch.x,))
        terms = objective.terms(logits, batch)
    else:
        leaves = params
        logits, terms = train_out
    derivatives = resolve_derivatives(derivatives, names, leaves)
    if derivatives not in ("forward", "reverse", "jvp"):
        raise ValueError(f"derivatives must be auto, forward, reverse or jvp, got '{derivatives}'")

    def weight_fn(loss: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        return functional_call(wnet, wnet_params, (loss, family))

    coeff = objective.coefficients(weight_fn, terms.detach(), batch)

    def per_sample(g_meta: list[torch.Tensor], scale: dict[str, float]) -> torch.Tensor:
        """dL_meta/dtheta = -sum_{i,t} d_{i,t} dc_{i,t}/dtheta, d the directional derivatives along the tangents."""
        common = set(scale.values())
        outer = common.pop() if len(common) == 1 else 1.0  # one step for all: scale d once instead of every tangent
        tangents = [scale[n] * t for n, t in zip(names, g_meta)] if outer == 1.0 else g_meta
        if derivatives == "reverse":
            d = reverse_directional_derivatives(terms, [leaves[n] for n in names], tangents)
        else:
            d = forward_directional_derivatives(model, leaves, buffers, batch, objective, names, tangents,
                                                fused=derivatives == "forward")
        return -outer * (coeff * d.detach()).sum()

    return meta_step_core(model, buffers, leaves, (coeff.detach() * terms).sum(),
                          VirtualUpdate(names, step, momentum_buffers, gates), (meta_x, meta_y), wnet_params,
                          per_sample, all_grads=train_out is not None, retain=derivatives == "reverse" or keep_graph)

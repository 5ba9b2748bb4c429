"""Measured alternatives for the per-sample directional derivatives ``d_i = <grad_w l_i, v>`` of the exact meta-step.

``scripts/bench_metastep.py`` times each of them (alone, against a plain forward of the batch, and inside a whole
exact meta-iteration with its peak memory) next to the implementation, the fused dual forward of
:func:`cmw_transfer.trainer.meta.metastep.forward_directional_derivatives`:

* ``reverse-shared``: the authors' double-backward form on the training forward's own graph: the weighted backward
  itself runs with ``create_graph`` on weights ``u = c`` (so it still yields the actual step's gradient), and after
  the meta pass ``d = grad_u <grad_w sum_i u_i l_i, v>``. No second forward, but the first-order graph of the
  backward stays alive through the meta pass and its backward runs generic double-backward kernels.
* ``tape``: a tangent-only pass. Forward hooks keep each convolution's output of the training forward
  (:class:`ConvTape`); the dual pass skips every primal convolution (BatchNorm / ReLU / add recompute their primal,
  elementwise) and runs only the fused tangent conv (:class:`ReplayTangents`). Costs the training batch's
  convolution outputs kept through the meta pass: free in the paper's order (its kept graph holds them), extra
  memory in the default order. It runs in the training forward's layout (NCHW), where the tangent convolutions
  are slower than the fused pass's channels-last ones.

Also :func:`conv_macs`, the multiply-accumulate count of a forward, which makes the floor of any exact forward-mode
pass arithmetic. Everything here equals ``torch.func.jvp`` in float64 (checked by the benchmark, see
:func:`agreement`); none of it is used by training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from cmw_transfer.trainer.meta.dual_forward import FusedTangents, _split
from cmw_transfer.trainer.meta.metastep import (
    VirtualStep,
    forward_directional_derivatives,
    virtual_names,
    virtual_weights,
)
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE

Params = dict[str, torch.Tensor]


class ConvTape:
    """Keeps every ``nn.Conv2d`` output of the forward run inside it, in call order (references, no copies), each
    with its version counter (an output a later in-place op overwrote is recomputed by the replay)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.outputs: list[tuple[torch.Tensor, int]] = []
        self._handles: list = []

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.outputs.append((output.detach(), output._version))

    def __enter__(self) -> ConvTape:
        self._handles = [m.register_forward_hook(self._keep) for m in self.model.modules()
                         if isinstance(m, nn.Conv2d)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


class ReplayTangents(FusedTangents):
    """:class:`FusedTangents` whose convolutions take their primal output from a :class:`ConvTape`."""

    def __init__(self, outputs: list[tuple[torch.Tensor, int]]) -> None:
        super().__init__()
        self._outputs = iter(outputs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            return self._conv(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)

    def _conv(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out, version = next(self._outputs)
        x, dx = _split(input)
        w, dw = _split(weight)
        if out._version != version:  # overwritten in place after the conv: recompute the primal
            out = F.conv2d(x, w, _split(bias)[0], stride, padding, dilation, groups)
        conv = lambda a, k: F.conv2d(a, k, None, stride, padding, dilation, groups)  # noqa: E731
        if dx is not None and dw is not None and groups == 1:
            tangent = F.conv2d(torch.cat([dx, x], 1), torch.cat([w, dw], 1), None, stride, padding, dilation)
        elif dx is not None and dw is not None:
            tangent = conv(dx, w) + conv(x, dw)
        elif dw is not None or dx is not None:
            tangent = conv(x, dw) if dx is None else conv(dx, w)
        else:
            return out
        db = _split(bias)[1] if bias is not None else None
        if db is not None:
            tangent = tangent + db.reshape(1, -1, 1, 1)
        return fwad.make_dual(out, tangent)


def tangent_only_directional_derivatives(model: nn.Module, params: Params, buffers: Params, batch: TrainBatch,
                                         objective: WeightedCE, names: list[str], tangents: list[torch.Tensor],
                                         conv_outputs: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``d`` by the tangent-only dual pass over a :class:`ConvTape` of the training forward at ``params``."""
    frozen = {k: p.detach() for k, p in params.items() if k not in names}
    clones = {k: b.clone() for k, b in buffers.items()}
    with torch.no_grad(), fwad.dual_level(), ReplayTangents(conv_outputs):
        dual = {n: fwad.make_dual(params[n].detach(), t) for n, t in zip(names, tangents)}
        terms = objective.terms(functional_call(model, ({**frozen, **dual}, clones), (batch.x,)), batch)
        return fwad.unpack_dual(terms).tangent


def shared_reverse_backward(terms: torch.Tensor, coeff: torch.Tensor, leaves: list[torch.Tensor]
                            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The weighted backward with ``create_graph`` on ``u = c``: (first-order graph of the gradient, ``u``)."""
    u = coeff.detach().clone().requires_grad_(True)
    grads = torch.autograd.grad((u * terms).sum(), leaves, create_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)], u


def shared_reverse_derivatives(grads: list[torch.Tensor], u: torch.Tensor, tangents: list[torch.Tensor]
                               ) -> torch.Tensor:
    """``d = grad_u <grad_w sum_i u_i l_i, v>``: the double backward through the gradient's own graph."""
    dot = sum((g * t).sum() for g, t in zip(grads, tangents) if g.requires_grad)
    return torch.autograd.grad(dot, u)[0]


def exact_iteration(method: str, model: nn.Module, wnet: nn.Module, batch: TrainBatch, xm: torch.Tensor,
                    ym: torch.Tensor, opt: torch.optim.Optimizer, wopt: torch.optim.Optimizer, lr: float,
                    order: str = "reuse") -> Params:
    """One exact MW-Net / CMW-Net iteration (plain-SGD virtual step, WeightedCE) with ``d`` computed by ``method``.

    The same steps as the toolkit's ``meta_gradient`` + net step + actual step; returns the net's gradients.
    """
    objective = WeightedCE()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = virtual_names(model, "exact")
    tape = ConvTape(model)
    if method == "tape":
        with tape:
            logits = model(batch.x)
    else:
        logits = model(batch.x)
    conv_outputs = tape.outputs
    terms = objective.terms(logits, batch)
    wparams = dict(wnet.named_parameters())
    coeff = objective.coefficients(lambda loss, fam: functional_call(wnet, wparams, (loss, fam)), terms.detach(),
                                   batch)
    leaves = [params[n] for n in names]
    if method == "reverse-shared":
        graph_grads, u = shared_reverse_backward(terms, coeff, leaves)
        grads = [g.detach() for g in graph_grads]
    else:
        grads = list(torch.autograd.grad((coeff.detach() * terms).sum(), leaves, retain_graph=order == "updated"))
    grad_of = dict(zip(names, grads))
    fast, scale = virtual_weights(params, grad_of, VirtualStep(lr), names)
    meta_loss = F.cross_entropy(functional_call(model, (fast, {k: b.clone() for k, b in buffers.items()}), (xm,)),
                                ym)
    g_meta = torch.autograd.grad(meta_loss, [fast[n] for n in names])
    tangents = [scale[n] * g for n, g in zip(names, g_meta)]
    if method == "reverse-shared":
        d = shared_reverse_derivatives(graph_grads, u, tangents)
        del graph_grads
    elif method == "tape":
        d = tangent_only_directional_derivatives(model, params, buffers, batch, objective, names, tangents,
                                                 conv_outputs)
        del conv_outputs
    else:
        d = forward_directional_derivatives(model, params, buffers, batch, objective, names, tangents)
    wgrads = torch.autograd.grad(-(coeff * d.detach()).sum(), list(wparams.values()))
    for p, g in zip(wparams.values(), wgrads):
        p.grad = g
    wopt.step()
    opt.zero_grad(set_to_none=True)
    if order == "updated":
        with torch.no_grad():
            new_coeff = objective.coefficients(wnet, terms.detach(), batch)
        (new_coeff * terms).sum().backward()
    else:
        for p, g in zip(leaves, grads):
            p.grad = g
    opt.step()
    return dict(zip(wparams, wgrads))


def conv_macs(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates per image of a forward of ``x``: convolutions (``conv_first``: those that read the
    image, i.e. get no input tangent) and linear layers."""
    counts = {"conv": 0.0, "conv_first": 0.0, "linear": 0.0}
    first = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() * module.in_channels // module.groups * kh * kw
            counts["conv"] += macs
            if inputs[0] is first[0]:  # the input image: no tangent flows into this conv
                counts["conv_first"] += macs
        else:
            counts["linear"] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    first.append(x)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {k: v / len(x) for k, v in counts.items()}


def agreement(model_name: str, create_model: Callable[..., nn.Module]) -> dict[str, float]:
    """Max relative difference of each method's ``d`` to ``torch.func.jvp``, float64, tiny batch (exactness)."""
    torch.manual_seed(0)
    model = create_model(model_name, 10, 3).double().train()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    batch = TrainBatch(x, torch.randint(0, 10, (6,)), torch.zeros(10, dtype=torch.long))
    objective, params, buffers = WeightedCE(), dict(model.named_parameters()), dict(model.named_buffers())
    names = virtual_names(model, "exact")
    tangents = [torch.randn_like(params[n]) for n in names]
    ref = forward_directional_derivatives(model, params, buffers, batch, objective, names, tangents, fused=False)
    out = {"fused dual forward": forward_directional_derivatives(model, params, buffers, batch, objective, names,
                                                                 tangents)}
    with ConvTape(model) as tape:
        terms = objective.terms(functional_call(model, (params, {k: b.clone() for k, b in buffers.items()}), (x,)),
                                batch)
    out["tape"] = tangent_only_directional_derivatives(model, params, buffers, batch, objective, names, tangents,
                                                       tape.outputs)
    graph_grads, u = shared_reverse_backward(terms, torch.ones_like(terms), [params[n] for n in names])
    out["reverse-shared"] = shared_reverse_derivatives(graph_grads, u, tangents)
    scale = float(ref.abs().max())
    return {k: float((v - ref).abs().max()) / scale for k, v in out.items()}


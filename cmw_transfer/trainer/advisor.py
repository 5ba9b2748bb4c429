"""Advisor networks (MFRW / MES): the meta-model, the masked/equalised loss and its meta-gradient, all pure.

The advisor ``Psi(f, L; theta)`` reads a sample's pooled backbone feature ``f`` (``d``) and its plain loss ``L``
and outputs a per-channel mask ``m`` in (0,1)^d (MFRW: the classifier sees ``m * f``) and a per-class vector ``s``
in (0,1)^C (MES: the equalisation softmax of :func:`cmw_transfer.eql.equalized_cross_entropy` with
``suppress = beta * s``). Both of its inputs are **detached** from the classifier: the advisor advises, it is not
part of the classifier's graph (as MW-Net detaches its loss input), so the virtual gradient ``g(theta)`` only
depends on ``theta`` through ``m`` and ``s``.

Meta-gradient. The virtual step is ``w_hat = w - lr * s_n * g_n(theta)`` per parameter ``n`` (``s_n`` the slope of
:class:`~cmw_transfer.trainer.metastep.VirtualStep`), so

    dL_meta/dtheta = -grad_theta h(theta),   h(theta) = sum_n < t_n, g_n(theta) >,   t_n = lr * s_n * dL_meta/dw_hat_n

The advisor output is not a scalar per-sample weight, so the per-sample decomposition of
:func:`~cmw_transfer.trainer.metastep.meta_gradient` does not apply; ``h`` is a directional derivative of the
training loss along ``t`` instead, computed one of two ways:

* ``forward`` (default for ``exact``): ``theta`` only enters the *head* (mask, classifier, MES), so
  ``h = <dL/df, df[t]> + <dL/dw_c, t_c>`` with ``df[t]`` the backbone's tangent along ``t`` from one dual forward
  (:class:`~cmw_transfer.trainer.dual_forward.FusedTangents`, no graph kept) and the two gradients from a
  reverse-over-reverse pass on the head only (``B x d`` features: negligible). Cost: one dual forward more than
  the CMW-Net exact step's, i.e. the same as it.
* ``reverse`` (``skip:N`` and ``famus``): ``g`` with ``create_graph`` down to the lowest virtually updated layer,
  then ``grad_theta`` of ``<t, g>``: the second-order path is cut exactly where MW-Net's is.

The meta pass always runs the virtually updated classifier on **plain** features with **plain** softmax; the mask
and MES appear only in the virtual and actual training losses, never in the meta loss or at evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from cmw_transfer.eql import equalized_cross_entropy
from cmw_transfer.errors import UserError
from cmw_transfer.parsing import parse_name_list
from cmw_transfer.trainer.dual_forward import FusedTangents
from cmw_transfer.trainer.metastep import FamusGates, MetaResult, StepSpec, _gate_gradients, virtual_weights

Params = dict[str, torch.Tensor]
ADVISOR_PARTS = ("mfrw", "mes")
EMBED = 100  # the paper's embedding size per input


def parse_advisor(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"mfrw,mes"`` -> ("mfrw", "mes"); at least one part, each once, no unknown or empty one
    (:func:`cmw_transfer.parsing.parse_name_list`)."""
    parts = parse_name_list(spec, "--advisor", choices=ADVISOR_PARTS)
    return tuple(p for p in ADVISOR_PARTS if p in parts)


class AdvisorNet(nn.Module):
    """Per-input FC+ReLU to 100-d embeddings (feature, loss), concatenated; FC+Sigmoid heads of size d and C."""

    def __init__(self, feature_dim: int, num_classes: int, parts: tuple[str, ...] = ADVISOR_PARTS,
                 embed: int = EMBED) -> None:
        super().__init__()
        self.parts = tuple(parts)
        self.feature_embed = nn.Sequential(nn.Linear(feature_dim, embed), nn.ReLU())
        self.loss_embed = nn.Sequential(nn.Linear(1, embed), nn.ReLU())
        self.mask_head = nn.Linear(2 * embed, feature_dim) if "mfrw" in self.parts else None
        self.mes_head = nn.Linear(2 * embed, num_classes) if "mes" in self.parts else None

    def forward(self, features: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask ``[B, d]`` or None, s ``[B, C]`` or None) from detached inputs."""
        h = torch.cat([self.feature_embed(features), self.loss_embed(loss[:, None])], dim=1)
        mask = torch.sigmoid(self.mask_head(h)) if self.mask_head is not None else None
        s = torch.sigmoid(self.mes_head(h)) if self.mes_head is not None else None
        return mask, s


# -- the classifier split ---------------------------------------------------------------------------------------
class FeatureView(nn.Module):
    """``x -> forward_head(forward_features(x), pre_logits=True)``: the pooled penultimate feature ``f``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.forward_head(self.m.forward_features(x), pre_logits=True)


def classifier_prefix(model: nn.Module) -> str:
    """Name of the final classifier module (``get_classifier()``); a one-line error for a model without the split."""
    missing = [a for a in ("forward_features", "forward_head", "get_classifier") if not hasattr(model, a)]
    if missing:
        raise UserError(f"--method advisor needs a backbone with timm's forward_features/forward_head/get_classifier "
                        f"split; {type(model).__name__} lacks {', '.join(missing)}")
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(f"--method advisor needs a linear classifier on pooled features; {type(model).__name__}'s "
                        f"get_classifier() is a {type(head).__name__}")
    for name, module in model.named_modules():
        if module is head and name:
            return name
    raise UserError(f"--method advisor: {type(model).__name__}.get_classifier() is not a submodule of it")


@dataclass(frozen=True)
class Split:
    """How to run the model in two parts: the feature view and the classifier's parameter names."""

    model: nn.Module
    prefix: str

    @property
    def view(self) -> FeatureView:
        return FeatureView(self.model)

    @property
    def head(self) -> nn.Linear:
        return self.model.get_classifier()

    def head_params(self, params: Params) -> Params:
        cut = len(self.prefix) + 1
        return {k[cut:]: v for k, v in params.items() if k.startswith(self.prefix + ".")}

    def features(self, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.view, ({f"m.{k}": v for k, v in params.items()},
                                           {f"m.{k}": v for k, v in buffers.items()}), (x,))

    def logits(self, head_params: Params, f: torch.Tensor) -> torch.Tensor:
        return functional_call(self.head, head_params, (f,))


def make_split(model: nn.Module) -> Split:
    return Split(model, classifier_prefix(model))


def advisor_terms(split: Split, head_params: Params, f: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                  s: torch.Tensor | None, beta: torch.Tensor) -> torch.Tensor:
    """Per-sample training loss of the virtual and actual passes: ``MES-CE(W_c (m * f), y; beta * s)``."""
    logits = split.logits(head_params, f if mask is None else mask * f)
    if s is None:
        return F.cross_entropy(logits, y, reduction="none")
    return equalized_cross_entropy(logits, y, beta.to(s.dtype) * s)


def plain_losses(split: Split, head_params: Params, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Phase 1, loss pre-calculation: CE on the plain features with the plain softmax (detached)."""
    with torch.no_grad():
        return F.cross_entropy(split.logits({k: v.detach() for k, v in head_params.items()}, f.detach()), y,
                               reduction="none")


def advise(advisor: nn.Module, advisor_params: Params | None, f: torch.Tensor, plain: torch.Tensor
           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The advisor on detached inputs (as a function of its parameters when ``advisor_params`` is given)."""
    if advisor_params is None:
        return advisor(f.detach(), plain.detach())
    return functional_call(advisor, advisor_params, (f.detach(), plain.detach()))


def _clone(buffers: Params) -> Params:
    return {k: b.clone() for k, b in buffers.items()}


def advisor_meta_gradient(
    model: nn.Module,
    advisor: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    beta: torch.Tensor,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
    step: StepSpec,
    names: list[str],
    *,
    momentum_buffers: Params | None = None,
    gates: FamusGates | None = None,
    advisor_params: Params | None = None,
    features: torch.Tensor | None = None,
    derivatives: str = "auto",
    keep_graph: bool = False,
    all_grads: bool = False,
) -> MetaResult:
    """The advisor's meta-gradient at ``params`` (``result.wnet_grads``); pure: nothing passed in is modified.

    ``names``: the virtually updated parameters (:func:`~cmw_transfer.trainer.metastep.virtual_names`), ``step``
    one :class:`~cmw_transfer.trainer.metastep.VirtualStep` or one per name. ``features`` lets the stage pass the
    pooled features of a training forward it ran on ``params`` itself (the real forward, which updates BatchNorm's
    running statistics once); otherwise the forward runs here on cloned buffers. ``all_grads``: also return the
    training gradient of every parameter at the current advisor (``result.train_grads``, for ``--actual-step
    reuse``). ``keep_graph`` leaves the training graph alive for the actual step.
    """
    split = make_split(model)
    advisor_params = advisor_params if advisor_params is not None else dict(advisor.named_parameters())
    if features is None:
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
        f = split.features(leaves, _clone(buffers), x)
    else:
        leaves, f = params, features
    head = split.head_params(leaves)
    if derivatives == "auto":
        derivatives = "forward" if len(names) == len(leaves) else "reverse"
    reverse = derivatives == "reverse"

    plain = plain_losses(split, head, f, y)
    mask, s = advise(advisor, advisor_params, f, plain)
    terms = advisor_terms(split, head, f, y, mask, s, beta)
    loss = terms.mean()
    grad_names = list(leaves) if all_grads else names
    grads = torch.autograd.grad(loss, [leaves[n] for n in grad_names], retain_graph=reverse or keep_graph,
                                allow_unused=True)
    grad_all = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(grad_names, grads)}
    grad_of = {n: grad_all[n] for n in names}

    gate_values = gates(grad_of) if gates is not None else {}
    fast, scale = virtual_weights(leaves, grad_of, step, names, momentum_buffers)
    meta_logits = functional_call(model, (fast, _clone(buffers)), (meta_x,))  # plain features, plain softmax
    meta_loss = F.cross_entropy(meta_logits, meta_y)
    g_meta = torch.autograd.grad(meta_loss, [fast[n] for n in names], allow_unused=True)
    g_meta = [torch.zeros_like(fast[n]) if g is None else g for n, g in zip(names, g_meta)]

    result = MetaResult(wnet_grads={}, meta_loss=float(meta_loss.detach()))
    if all_grads:
        result.train_grads = grad_all
    if gates is not None:
        result.active = [n for n in names if float(gate_values[n].detach()) > 0.5]
        g_meta_gated = [g if n in result.active else torch.zeros_like(g) for n, g in zip(names, g_meta)]
        result.gate_grads = _gate_gradients(gates, gate_values, names, g_meta, grad_of, result.active, scale)
        g_meta = g_meta_gated
    tangents = {n: scale[n] * g for n, g in zip(names, g_meta)}
    if reverse:
        h = _reverse_direction(loss, leaves, tangents, keep_graph)
    else:
        h = _forward_direction(split, leaves, buffers, x, y, f, head, mask, s, beta, tangents)
    wgrads = torch.autograd.grad(-h, list(advisor_params.values()), allow_unused=True)
    result.wnet_grads = {k: torch.zeros_like(p) if g is None else g
                         for (k, p), g in zip(advisor_params.items(), wgrads)}
    return result


def _reverse_direction(loss: torch.Tensor, leaves: Params, tangents: Params, keep_graph: bool) -> torch.Tensor:
    """``h = <t, grad_w L(theta)>`` with the training graph differentiated twice, down to the lowest virtual layer."""
    names = list(tangents)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, retain_graph=True,
                                allow_unused=True)
    terms = [(g * tangents[n]).sum() for n, g in zip(names, grads) if g is not None]
    if not terms:
        return torch.zeros((), device=loss.device, requires_grad=True)
    return torch.stack(terms).sum()


def _forward_direction(split: Split, leaves: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor,
                       f: torch.Tensor, head: Params, mask: torch.Tensor | None, s: torch.Tensor | None,
                       beta: torch.Tensor, tangents: Params) -> torch.Tensor:
    """``h = <dL/df, df[t]> + <dL/dw_c, t_c>``: the backbone's tangent by one dual forward, the rest on the head."""
    head_names = {f"{split.prefix}.{k}" for k in head}
    backbone = {n: t for n, t in tangents.items() if n not in head_names}
    df = torch.zeros_like(f)
    if backbone:
        frozen = {k: p.detach() for k, p in leaves.items() if k not in backbone}
        with torch.no_grad(), fwad.dual_level(), FusedTangents():
            dual = {n: fwad.make_dual(leaves[n].detach(), t.detach()) for n, t in backbone.items()}
            out = split.features({**frozen, **dual}, _clone(buffers), x)
            tangent = fwad.unpack_dual(out).tangent
        if tangent is not None:
            df = tangent
    f_leaf = f.detach().requires_grad_(True)
    head_leaf = {k: v.detach().requires_grad_(True) for k, v in head.items()}
    loss = advisor_terms(split, head_leaf, f_leaf, y, mask, s, beta).mean()
    keys = list(head_leaf)
    grads = torch.autograd.grad(loss, [f_leaf, *head_leaf.values()], create_graph=True, allow_unused=True)
    h = (grads[0] * df).sum()
    for k, g in zip(keys, grads[1:]):
        t = tangents.get(f"{split.prefix}.{k}")
        if g is not None and t is not None:
            h = h + (g * t).sum()
    return h

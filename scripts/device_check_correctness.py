"""The correctness half of ``device_check.py``: CUDA against CPU, fused against ``torch.func.jvp``, AMP and
channels-last against float32, ``torch.compile`` against eager. Every check returns a dict with ``status``
(``pass`` / ``fail`` / ``skipped``), what it ``measured`` and the ``tolerance`` it was held to.

Float32 references run with TF32 off (:func:`strict_float32`): on CUDA, cuDNN convolutions default to TF32, which
would make "float32" itself a 10-bit-mantissa reference.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# the project's API, in one place (a moved module is a one-line fix here)
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import DegenerateScalesWarning
from cmw_transfer.dataset.formats import digits
from cmw_transfer.models import create_model
from cmw_transfer.trainer.apply.steps import ApplyStepper
from cmw_transfer.trainer.meta.metastep import (
    VirtualStep,
    forward_directional_derivatives,
    meta_gradient,
    virtual_names,
)
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE
from cmw_transfer.weighting import CMWLoss
from tests.reference_official import authors_grads_as_cmwnet, authors_net_like, official_meta_step

FAMILY = {1: [0] * 10, 3: [2, 2, 1, 1, 1, 0, 0, 0, 0, 0]}  # class -> head (the authors' ``c``)
SHIPPED_NET = "pretrained:cmwnet-digits-pmd"  # the frozen net of the apply checks: shipped, offline
AMP_LOSS_RTOL = 0.05  # mean training loss of one AMP / channels-last epoch vs float32
CHANNELS_LAST_RTOL = 1e-3
COMPILE_RTOL = 1e-4  # torch.compile vs eager: per-step losses and weights after the steps (float32 reordering)


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _verdict(measured: float, tolerance: float, **extra: Any) -> dict[str, Any]:
    ok = bool(np.isfinite(measured)) and measured <= tolerance
    return {"status": "pass" if ok else "fail", "measured": measured, "tolerance": tolerance, **extra}


def _rel_max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max abs difference, largest entry of ``b``) over matching tensors."""
    diff = max(float((a[k].detach().cpu() - b[k].detach().cpu()).abs().max()) for k in b)
    return diff, max(float(v.detach().abs().max()) for v in b.values())


HEAD_COVERING = torch.tensor([0, 5, 2, 1, 6, 3, 7, 4, 8, 9])  # labels in an order whose first 3 use every head


def _meta_problem(model_name: str, heads: int, batch: int, meta: int, size: int, device: str):
    """Float64 model with non-trivial BN, a K-head net with distinct heads, fixed batches."""
    torch.manual_seed(heads)
    model = create_model(model_name, 10, 3).double().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
    net = CMWNet(hidden_size=100, num_heads=heads).double()
    with torch.no_grad():
        net.heads.weight.mul_(3.0)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    y = HEAD_COVERING[torch.arange(batch) % 10]
    xm = torch.randn(meta, 3, size, size, dtype=torch.float64)
    ym = torch.randint(0, 10, (meta,))
    model, net = model.to(device), net.to(device)
    tb = TrainBatch(x.to(device), y.to(device), torch.tensor(FAMILY[heads], device=device))
    return model, net, tb, xm.to(device), ym.to(device)


def _exact(model, net, tb, xm, ym) -> dict[str, torch.Tensor]:
    res = meta_gradient(model, net, dict(model.named_parameters()), dict(model.named_buffers()), tb, xm, ym,
                        WeightedCE(), VirtualStep(0.1), virtual_names(model, "exact"))
    return {n: g.detach().cpu() for n, g in res.wnet_grads.items()}


def meta_gradient_cuda_vs_cpu(heads: int, sizes: dict[str, int], cuda: bool) -> dict[str, Any]:
    """The exact meta-gradient on CUDA equals the CPU's (float64) within 1e-10 of its scale."""
    if not cuda:
        return {"status": "skipped", "detail": "no CUDA device"}
    args = (sizes["meta_model"], heads, sizes["batch"], sizes["meta"], sizes["size"])
    cpu = _exact(*_meta_problem(*args, "cpu"))
    gpu = _exact(*_meta_problem(*args, "cuda"))
    diff, scale = _rel_max_diff(gpu, cpu)
    return _verdict(diff / max(scale, 1.0), 1e-10, max_abs_diff=diff, largest=scale)


def meta_gradient_vs_stand_in(heads: int, sizes: dict[str, int], device: str) -> dict[str, Any]:
    """The exact meta-gradient against the authors' step as the stand-in writes it (float64, on ``device``)."""
    name = sizes["meta_model"]
    model, net, tb, xm, ym = _meta_problem(name, heads, sizes["batch"], sizes["meta"], sizes["size"], device)
    ours = _exact(model, net, tb, xm, ym)
    theirs_net = authors_net_like(net).to(device)
    official_meta_step(lambda: create_model(name, 10, 3).double(), model, theirs_net, tb.x, tb.y, FAMILY[heads],
                       xm, ym, 0.1)
    diff, scale = _rel_max_diff(ours, authors_grads_as_cmwnet(theirs_net))
    return _verdict(diff / max(scale, 1.0), 1e-10, max_abs_diff=diff, largest=scale,
                    detail="baseline: stand-in (tests/reference_official.py)")


def dual_forward_vs_jvp(model_name: str, sizes: dict[str, int], device: str) -> dict[str, Any]:
    """Fused dual forward vs ``torch.func.jvp``, float64, train-mode BatchNorm."""
    torch.manual_seed(0)
    model = create_model(model_name, 10, 3).double().train().to(device)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    n = sizes["dual_batch"]
    tb = TrainBatch(torch.randn(n, 3, sizes["size"], sizes["size"], dtype=torch.float64, device=device),
                    torch.arange(n, device=device) % 10, torch.zeros(10, dtype=torch.long, device=device))
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = virtual_names(model, "exact")
    tangents = [torch.randn_like(params[k]) for k in names]
    fused = forward_directional_derivatives(model, params, buffers, tb, WeightedCE(), names, tangents)
    ref = forward_directional_derivatives(model, params, buffers, tb, WeightedCE(), names, tangents, fused=False)
    scale = float(ref.abs().max())
    diff = float((fused - ref).abs().max())
    return _verdict(diff / max(scale, 1e-300), 1e-10, max_abs_diff=diff, largest=scale)


def _digits(device: str, size: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The embedded digits' train split as [N, C, size, size] on ``device`` (3 channels once upsampled)."""
    ds = digits.load(None, "train")
    x = torch.from_numpy(ds.data[:limit])
    y = torch.from_numpy(ds.targets[:limit])
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x.to(device), y.to(device), np.bincount(ds.targets, minlength=10)


def _criterion(counts: np.ndarray, device: str) -> CMWLoss:
    with warnings.catch_warnings():  # the digits are balanced: one family for every head, as the net is told
        warnings.simplefilter("ignore", DegenerateScalesWarning)
        return CMWLoss.from_spec(SHIPPED_NET, counts).to(device)


def apply_epoch(model_name: str, data, device: str, batch: int, amp_dtype: torch.dtype | None = None,
                scaler: bool = False, channels_last: bool = False, lr: float = 0.05) -> dict[str, Any]:
    """One epoch of the real apply step (frozen shipped CMW-Net) from a fixed init and batch order."""
    x, y, counts = data
    torch.manual_seed(0)
    model = create_model(model_name, 10, x.shape[1]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    criterion = _criterion(counts, device)
    grad_scaler = torch.amp.GradScaler(torch.device(device).type) if scaler else None
    stepper = ApplyStepper(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), criterion=criterion,
                           amp_dtype=amp_dtype, scaler=grad_scaler)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for i in range(0, len(y) - batch + 1, batch):
        idx = order[i:i + batch]
        losses.append(float(stepper(x[idx], y[idx], idx, True)))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"mean_loss": float(np.mean(losses)), "first_loss": losses[0],
            "finite": bool(finite and np.isfinite(losses).all()),
            "loss_scale": None if grad_scaler is None else float(grad_scaler.get_scale())}  # halved per skipped step


def apply_epoch_vs_float32(model_name: str, data, device: str, batch: int, mode: str) -> dict[str, Any]:
    """``mode``: ``bf16`` (autocast), ``fp16`` (autocast + GradScaler) or ``channels-last`` (float32)."""
    with strict_float32():
        ref = apply_epoch(model_name, data, device, batch)
        kwargs: dict[str, Any] = {"bf16": {"amp_dtype": torch.bfloat16},
                                  "fp16": {"amp_dtype": torch.float16, "scaler": True},
                                  "channels-last": {"channels_last": True}}[mode]
        got = apply_epoch(model_name, data, device, batch, **kwargs)
    rel = abs(got["mean_loss"] - ref["mean_loss"]) / abs(ref["mean_loss"])
    tol = CHANNELS_LAST_RTOL if mode == "channels-last" else AMP_LOSS_RTOL
    out = _verdict(rel if got["finite"] else float("inf"), tol, mean_loss=got["mean_loss"],
                   mean_loss_fp32=ref["mean_loss"], first_loss=got["first_loss"], first_loss_fp32=ref["first_loss"],
                   loss_scale=got["loss_scale"])
    out["detail"] = "relative difference of the epoch's mean training loss; weights and losses finite"
    return out


def compile_vs_eager(data, device: str, batch: int, steps: int, backend: str) -> dict[str, Any]:
    """``torch.compile`` of the model inside the apply step vs eager: per-step losses and the weights after."""
    x, y, counts = data
    runs = []
    with strict_float32():
        for compiled in (False, True):
            torch.manual_seed(0)
            model = create_model("small_cnn", 10, x.shape[1]).to(device)
            net = torch.compile(model, backend=backend) if compiled else model
            criterion = _criterion(counts, device)
            stepper = ApplyStepper(net, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   criterion=criterion)
            idx = torch.arange(batch, device=device)
            losses = [float(stepper(x[idx + k * batch], y[idx + k * batch], idx, True)) for k in range(steps)]
            runs.append((np.array(losses), copy.deepcopy(model.state_dict())))
    (eager_l, eager_w), (comp_l, comp_w) = runs
    loss_rel = float(np.max(np.abs(comp_l - eager_l) / np.abs(eager_l)))
    w_diff, w_scale = _rel_max_diff(comp_w, eager_w)
    worst = max(loss_rel, w_diff / max(w_scale, 1.0))
    return _verdict(worst, COMPILE_RTOL, backend=backend, steps=steps, loss_max_rel_diff=loss_rel,
                    weights_max_abs_diff=w_diff, detail="small_cnn on the embedded digits")


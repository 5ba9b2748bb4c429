"""Run the authors' own MW-Net / CMW-Net training step from checkouts the user points to (nothing of theirs is here).

``--official-mwn DIR``: a checkout of github.com/xjtushujun/meta-weight-net; ``MW-Net.py`` is imported from it with
importlib and its ``train()`` runs **unchanged** on a one-batch loader (a list holding one ``(inputs, targets)``
pair, so the step is timed without data loading). ``--official-cmwn DIR``: a checkout of
github.com/xjtushujun/CMW-Net; its ``ACVNet`` (``section4/Feature-dependent_Label_Noise/resnet.py``, as ``mwn.py``
builds it: ``ACVNet(1, 100, 100, 1, 3)``) replaces MW-Net's ``VNet`` through :class:`LabelledHeads`, a two-line
adapter that hands it the batch's one-hot labels and the class -> head map ``c``, which ``MW-Net.py``'s
``vnet(cost)`` calls do not pass.

What is patched, and why (the least that lets their files run here, all undone afterwards):

* importing ``MW-Net.py`` runs its top level: ``sys.argv`` is set for its ``parse_args()``; its data module
  ``load_corrupted_data`` is replaced in ``sys.modules`` by one whose ``CIFAR10`` / ``CIFAR100`` hold no data (the
  module-level ``build_dataset()`` would download CIFAR; ``train()`` gets our loader instead); its prints are
  swallowed; the global RNG state it seeds is restored. Their ``resnet`` module is imported from the checkout and
  taken out of ``sys.modules`` again (CMW-Net's file of the same name is loaded under another name);
* their code hard-codes CUDA (``build_model().cuda()``, ``VNet(...).cuda()``, ``torch.tensor([]).cuda()`` in
  ``ACVNet``'s head loop, ``device = torch.device("cuda")``): on any other device :func:`cuda_calls_to` makes
  ``Module.cuda`` / ``Tensor.cuda`` move to that device while their code runs, and the module global ``device`` is
  set to it. On a CUDA device nothing is patched;
* ``train()``'s per-epoch print is swallowed; for a float64 check the default dtype is float64 while their code
  runs (their ``build_model()`` and ``Meta*`` layers create tensors in the default dtype).

The model and optimizers ``train()`` gets are built as ``MW-Net.py``'s top level builds them (``build_model()``:
their option-A ``ResNet32``; ``SGD(model.params(), args.lr, momentum, weight_decay)``; ``VNet(1, 100, 1)`` and
``Adam(vnet.params(), 1e-3, weight_decay=1e-4)``), with ``ACVNet`` as ``mwn.py`` builds it; the module global
``model`` is set to ours. :func:`copy_classifier` / :func:`copy_weighting_net` give them the project's weights, so
both sides start from the same function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

MWN_FILE = "MW-Net.py"
CMWN_FILE = Path("section4") / "Feature-dependent_Label_Noise" / "resnet.py"
LOCAL_MODULES = ("resnet", "wideresnet", "load_corrupted_data")  # names their imports resolve in the checkout


class LoadError(RuntimeError):
    """A checkout that does not hold the authors' files where expected (the message says what is missing)."""


@contextlib.contextmanager
def cuda_calls_to(device: torch.device | str) -> Iterator[None]:
    """While active, ``Module.cuda()`` and ``Tensor.cuda()`` move to ``device`` (nothing changes on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        yield
        return
    module_cuda, tensor_cuda = nn.Module.cuda, torch.Tensor.cuda
    nn.Module.cuda = lambda self, *a, **k: self.to(device)  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.cuda, torch.Tensor.cuda = module_cuda, tensor_cuda  # type: ignore[method-assign]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Their ``build_model()`` and ``Meta*`` layers create tensors in the default dtype (float64 checks need it)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


class _NoData(torch.utils.data.Dataset):
    """Stands in for their CIFAR datasets at import time: one item, never read (train() gets our loader)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> Any:
        raise RuntimeError("the authors' datasets are not loaded here")


@contextlib.contextmanager
def _isolated_imports(directory: Path, stubs: dict[str, types.ModuleType]) -> Iterator[None]:
    """Their flat imports (``from resnet import ...``) resolve in ``directory``; ``sys.modules`` is restored after."""
    saved = {name: sys.modules.pop(name) for name in (*LOCAL_MODULES, *stubs) if name in sys.modules}
    sys.modules.update(stubs)
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))
        for name in (*LOCAL_MODULES, *stubs):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _exec_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _file_in(directory: str | Path, relative: str | Path, what: str) -> Path:
    path = Path(directory) / relative
    if not path.is_file():
        raise LoadError(f"{path} not found: --{what} takes a checkout of github.com/xjtushujun/{what_repo(what)}")
    return path


def what_repo(option: str) -> str:
    return {"official-mwn": "meta-weight-net", "official-cmwn": "CMW-Net"}[option]


def check_checkouts(mwn_dir: str | Path | None, cmwn_dir: str | Path | None) -> None:
    """LoadError unless each directory given holds the authors' file this module loads from it."""
    if mwn_dir:
        _file_in(mwn_dir, MWN_FILE, "official-mwn")
    if cmwn_dir:
        _file_in(cmwn_dir, CMWN_FILE, "official-cmwn")


def load_mwnet(directory: str | Path, device: torch.device | str, argv: Sequence[str] = ()) -> types.ModuleType:
    """``MW-Net.py`` imported from ``directory``, its top level run on ``device`` without data or network."""
    path = _file_in(directory, MWN_FILE, "official-mwn")
    data = types.ModuleType("load_corrupted_data")
    data.CIFAR10 = data.CIFAR100 = _NoData  # type: ignore[attr-defined]
    saved_argv, rng = sys.argv, torch.random.get_rng_state()
    sys.argv = [str(path), *argv]
    try:
        with _isolated_imports(path.parent, {"load_corrupted_data": data}), cuda_calls_to(device), \
                contextlib.redirect_stdout(io.StringIO()):
            module = _exec_file(path, "authors_mw_net")
    finally:
        sys.argv = saved_argv
        torch.random.set_rng_state(rng)  # their top level seeds the global generator
    module.device = torch.device(device)  # type: ignore[attr-defined]
    return module


def load_acvnet(directory: str | Path) -> type[nn.Module]:
    """CMW-Net's ``ACVNet`` class from ``directory`` (its ``resnet.py`` has no top-level side effects)."""
    path = _file_in(directory, CMWN_FILE, "official-cmwn")
    with _isolated_imports(path.parent, {}):
        module = _exec_file(path, "authors_cmw_net_resnet")
    if not hasattr(module, "ACVNet"):
        raise LoadError(f"{path} defines no ACVNet")
    return module.ACVNet


class LabelledHeads(nn.Module):
    """``MW-Net.py`` calls ``vnet(cost)``; ``ACVNet`` also takes the one-hot labels and the class -> head map."""

    def __init__(self, net: nn.Module, onehot: torch.Tensor, c: Sequence[int]) -> None:
        super().__init__()
        self.net, self.onehot, self.c = net, onehot, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.onehot, self.c)


def _leaves(module: nn.Module) -> dict[str, torch.Tensor]:
    """Their ``Meta*`` layers keep weights as buffers with ``requires_grad``: parameters and buffers by name."""
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


def copy_classifier(theirs: nn.Module, ours: nn.Module) -> None:
    """Our classifier's weights and BN statistics into their ``ResNet32`` (``fc`` is their ``linear``)."""
    target = _leaves(theirs)
    with torch.no_grad():
        for name, value in ours.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            target[name.replace("fc.", "linear.", 1) if name.startswith("fc.") else name].copy_(value)


def classifier_state(theirs: nn.Module) -> dict[str, torch.Tensor]:
    """Their classifier's tensors under our names."""
    return {("fc." + n[len("linear."):] if n.startswith("linear.") else n): t for n, t in _leaves(theirs).items()}


def _net_layout(vnet: nn.Module) -> dict[str, Any]:
    """Their weighting net's tensors laid out as ours: MW-Net's ``VNet`` or CMW-Net's ``ACVNet``."""
    vnet = vnet.net if isinstance(vnet, LabelledHeads) else vnet
    t = _leaves(vnet)
    if "linear1.weight" in t:
        return {"trunk.weight": t["linear1.weight"], "trunk.bias": t["linear1.bias"],
                "heads.weight": [t["linear2.weight"]], "heads.bias": [t["linear2.bias"]]}
    k = len(vnet.classfier.layers)  # the authors' spelling
    return {"trunk.weight": t["feature.layer.0.weight"], "trunk.bias": t["feature.layer.0.bias"],
            "heads.weight": [t[f"classfier.layers.{i}.0.weight"] for i in range(k)],
            "heads.bias": [t[f"classfier.layers.{i}.0.bias"] for i in range(k)]}


def copy_weighting_net(theirs: nn.Module, net: nn.Module) -> None:
    """Our ``CMWNet``'s function into their ``VNet`` (K=1) or ``ACVNet`` (K heads)."""
    layout, ours = _net_layout(theirs), dict(net.named_parameters())
    with torch.no_grad():
        layout["trunk.weight"].copy_(ours["trunk.weight"])
        layout["trunk.bias"].copy_(ours["trunk.bias"])
        for i, (w, b) in enumerate(zip(layout["heads.weight"], layout["heads.bias"])):
            w.copy_(ours["heads.weight"][i:i + 1])
            b.copy_(ours["heads.bias"][i:i + 1])


def weighting_net_grads(theirs: nn.Module) -> dict[str, torch.Tensor]:
    """Their weighting net's ``.grad`` under our ``CMWNet`` names."""
    layout = _net_layout(theirs)
    return {"trunk.weight": layout["trunk.weight"].grad, "trunk.bias": layout["trunk.bias"].grad,
            "heads.weight": torch.cat([w.grad for w in layout["heads.weight"]]),
            "heads.bias": torch.cat([b.grad for b in layout["heads.bias"]])}


class AuthorsStep:
    """One call = ``MW-Net.py``'s ``train()`` on one batch: their meta step, net step and actual step, unchanged.

    ``family`` (class -> head, the authors' ``c``) selects CMW-Net's ``ACVNet`` from ``cmwn_dir``; without it the
    weighting net is MW-Net's own ``VNet(1, 100, 1)``.
    """

    def __init__(self, mwn_dir: str | Path, device: torch.device | str, x: torch.Tensor, y: torch.Tensor,
                 x_meta: torch.Tensor, y_meta: torch.Tensor, num_classes: int = 10, cmwn_dir: str | Path | None = None,
                 family: Sequence[int] | None = None) -> None:
        self.device, self.dtype = torch.device(device), x.dtype
        dataset = "cifar10" if num_classes == 10 else "cifar100"
        self.module = load_mwnet(mwn_dir, self.device, ["--dataset", dataset, "--batch_size", str(len(x))])
        m = self.module
        with cuda_calls_to(self.device), default_dtype(self.dtype):
            self.model = m.build_model().to(self.device)
            m.model = self.model  # the globals train() may read are the ones we run
            self.optimizer_model = torch.optim.SGD(self.model.params(), m.args.lr, momentum=m.args.momentum,
                                                   weight_decay=m.args.weight_decay)
            if cmwn_dir is None:
                self.vnet: nn.Module = m.VNet(1, 100, 1).to(self.device)
                net_params = self.vnet.params()
            else:
                acv = load_acvnet(cmwn_dir)(1, 100, 100, 1, max(family or [0]) + 1).to(self.device)
                onehot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
                self.vnet = LabelledHeads(acv, onehot, list(family or [0] * num_classes))
                net_params = acv.params()
            self.optimizer_vnet = torch.optim.Adam(net_params, 1e-3, weight_decay=1e-4)
        self.loader, self.meta_loader = [(x, y)], [(x_meta, y_meta)]

    def __call__(self) -> None:
        with cuda_calls_to(self.device), default_dtype(self.dtype), contextlib.redirect_stdout(io.StringIO()):
            self.module.train(self.loader, self.meta_loader, self.model, self.vnet, self.optimizer_model,
                              self.optimizer_vnet, 0)

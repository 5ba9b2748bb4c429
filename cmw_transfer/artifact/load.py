"""One way to load a weighting net by its spec, with what identifies it: the net, its kind, its content digest and
the Hub commit it resolved to (what a resumed run must find again)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmw_transfer.artifact.curvenet import CurveNet, artifact_method
from cmw_transfer.artifact.net import CMWNet


@dataclass(frozen=True)
class Loaded:
    """A loaded weighting net: ``net`` (a :class:`CMWNet` when ``kind == "cmwnet"``, a :class:`CurveNet` when
    ``"curvenet"``) and ``identity`` (``weights digest``, and ``weights revision`` for a ``hub:`` spec)."""

    net: nn.Module
    kind: str
    identity: dict[str, Any]


def state_digest(module: nn.Module, extra: Any = None) -> str:
    """Content digest of a module's tensors (names, dtypes, shapes, bytes) and a JSON-able ``extra``."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def load(spec: str) -> Loaded:
    """The net ``spec`` names (``DIR``, ``FILE.safetensors``, ``hub:org/name[@rev]``, ``pretrained:NAME``): a
    CurveNet when its header says so, else a CMW-Net; every file validated, nothing unpickled."""
    if artifact_method(spec) == "curvenet":
        curvenet = CurveNet.from_pretrained(spec)
        return Loaded(curvenet, "curvenet", {"weights digest": state_digest(curvenet, curvenet.config())})
    net = CMWNet.from_pretrained(spec)
    identity: dict[str, Any] = {"weights digest": state_digest(net, net.config())}
    if spec.startswith("hub:"):
        identity["weights revision"] = net.revision
    return Loaded(net, "cmwnet", identity)

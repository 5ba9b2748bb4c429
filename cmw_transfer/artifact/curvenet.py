"""CurveNet: ``G(normalised loss curve, class term) -> weight``, and its artifact (safetensors + config).

Architecture (the authors' ``net/curvenet.py``): the curve goes through ``Linear(D->128) ReLU Linear(128->128)
ReLU Linear(128->P) ReLU`` (P = 64), a class embedding ``Embedding(K, P)`` is added, then ``Linear(P->128) ReLU
Linear(128->64) ReLU Linear(64->1)`` and ``w = factor * sigmoid(.) + bias`` (CIFAR-10: factor 1, bias 0.02, so
w in (0.02, 1.02)). Xavier-initialised; the last bias starts at 4.5, so every initial weight is about 1. The
authors' code adds the embedding twice (``out + y_emb`` in two places), a factor 2 on a learned table: added once
here.

Two modes:

- ``faithful``: the paper's net. The class term embeds the observed *label* (K = number of classes) and the curve
  length D = T - S is the probe's. It is tied to the source's label set and probe length: **not transferable**.
- ``transferable``: the curve is resampled to a fixed D over relative time, the class term embeds the
  class-size *family* (K families re-fitted on any target's class counts, as CMW-Net's heads), and the probe's
  schedule (in fractions of the run) is part of the artifact; a target must be probed with that schedule.

The file format is :mod:`cmw_transfer.artifact.fileformat`'s: tensors in safetensors, the whole config in the
header (sorted, so the same net gives the same bytes), ``config.json`` beside it. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from cmw_transfer.artifact.fileformat import (
    CONFIG_KEY,
    CONFIG_NAME,
    VERSION_KEY,
    WEIGHTS_NAME,
    canonical_header,
    read_header,
)
from cmw_transfer.atomic import atomic_path, write_json
from cmw_transfer.defaults import CURVENET_MODES
from cmw_transfer.errors import UserError
from cmw_transfer.untrusted import loads, safetensors_metadata

METHOD = "curvenet"
MODES = CURVENET_MODES
FORMAT_VERSION = 1
LAST_BIAS = 4.5  # sigmoid(4.5) = 0.989: initial weights ~1, as the authors' init


class CurveNet(nn.Module):
    """The curve-perception weighting net; ``forward(curve [B, D], key [B]) -> weight [B]``."""

    def __init__(self, curve_length: int, num_keys: int, mode: str = "faithful", embed_dim: int = 64,
                 hidden: int = 128, factor: float = 1.0, bias: float = 0.02, *, curve_skip: int = 5,
                 probe: dict[str, Any] | None = None, centers: list[float] | None = None,
                 provenance: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if curve_length < 1 or num_keys < 1 or embed_dim < 1 or hidden < 1:
            raise ValueError("curve_length, num_keys, embed_dim and hidden must be >= 1")
        self.curve_length, self.num_keys, self.mode = int(curve_length), int(num_keys), mode
        self.embed_dim, self.hidden = int(embed_dim), int(hidden)
        self.factor, self.bias = float(factor), float(bias)
        self.curve_skip = int(curve_skip)
        self.probe = dict(probe or {})
        self.centers = [float(c) for c in centers] if centers is not None else None
        self.provenance = dict(provenance or {})
        self.format_version = int(format_version)
        self.curve = nn.Sequential(nn.Linear(curve_length, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, embed_dim), nn.ReLU())
        self.embedding = nn.Embedding(num_keys, embed_dim)
        self.head = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 64), nn.ReLU(),
                                  nn.Linear(64, 1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.head[-1].bias, LAST_BIAS)

    def forward(self, curve: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if curve.dim() != 2 or curve.shape[1] != self.curve_length:
            raise UserError(f"this CurveNet reads curves of length {self.curve_length}, got shape "
                            f"{tuple(curve.shape)}: probe with its schedule ({self.probe.get('epochs')} epochs, "
                            f"skip {self.curve_skip}) or use the transferable mode")
        key = key.reshape(-1).long()
        h = self.curve(curve.to(self.head[0].weight.dtype)) + self.embedding(key)
        return self.factor * torch.sigmoid(self.head(h).reshape(-1)) + self.bias

    # -- configuration and persistence --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"method": METHOD, "mode": self.mode, "curve_length": self.curve_length, "num_keys": self.num_keys,
                "embed_dim": self.embed_dim, "hidden": self.hidden, "factor": self.factor, "bias": self.bias,
                "curve_skip": self.curve_skip, "probe": self.probe, "centers": self.centers,
                "provenance": self.provenance, "format_version": self.format_version}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """``model.safetensors`` (config in the header) and ``config.json``, both atomically."""
        directory = Path(directory)
        config = self.config()
        validate_config(config, source=str(directory))
        tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in self.state_dict().items()}
        metadata = {"format": "pt", VERSION_KEY: str(self.format_version),
                    CONFIG_KEY: json.dumps(config, sort_keys=True)}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            tmp.write_bytes(canonical_header(save(tensors, metadata=metadata)))
        write_json(directory / CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> CurveNet:
        """A validated load of a directory or ``.safetensors`` file written by :meth:`save_pretrained`."""
        path = Path(path)
        config, tensors = read_header(path)
        source = str(path)
        if config.get("method") != METHOD:
            raise UserError(f"{source} is not a CurveNet artifact (method {config.get('method', 'cmwnet')!r})")
        validate_config(config, source=source)
        net = cls(config["curve_length"], config["num_keys"], config["mode"], config["embed_dim"], config["hidden"],
                  config["factor"], config["bias"], curve_skip=config["curve_skip"], probe=config.get("probe"),
                  centers=config.get("centers"), provenance=config.get("provenance"),
                  format_version=config["format_version"])
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise UserError(f"{source}: tensors {sorted(got.items())} do not match the config's CurveNet "
                            f"{sorted(expected.items())}; re-export it")
        for name, t in tensors.items():
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise UserError(f"{source}: {name} is not finite float32; the net is unusable, re-train it")
        net.load_state_dict(tensors, strict=True)
        return net


def validate_config(config: dict[str, Any], *, source: str) -> None:
    for key in ("curve_length", "num_keys", "embed_dim", "hidden", "curve_skip", "format_version"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "curve_skip" else 1):
            raise UserError(f"{source}: CurveNet config {key} must be a positive integer, got {value!r}")
    if config["format_version"] > FORMAT_VERSION:
        raise UserError(f"{source}: CurveNet format version {config['format_version']} is newer than this "
                        f"cmw-transfer supports ({FORMAT_VERSION}); upgrade cmw-transfer")
    if config.get("mode") not in MODES:
        raise UserError(f"{source}: CurveNet mode must be one of {', '.join(MODES)}, got {config.get('mode')!r}")
    for key in ("factor", "bias"):
        if not isinstance(config.get(key), int | float) or not math.isfinite(config[key]):
            raise UserError(f"{source}: CurveNet {key} must be a finite number, got {config.get(key)!r}")
    if config["mode"] == "transferable":
        centers = config.get("centers")
        if not isinstance(centers, list) or len(centers) != config["num_keys"]:
            raise UserError(f"{source}: a transferable CurveNet needs {config['num_keys']} class-size centers, got "
                            f"{centers!r}")
        if not isinstance(config.get("probe"), dict) or "epochs" not in config["probe"]:
            raise UserError(f"{source}: a transferable CurveNet records its probe schedule; this one has none")


def artifact_method(spec: str) -> str | None:
    """``"curvenet"`` when ``spec`` names a local CurveNet artifact, else None (CMW-Net, hub, pretrained, missing)."""
    path = Path(spec)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        return None
    try:  # the bounded reader: a hostile header is reported by the CMW-Net loader that runs next
        config = loads(safetensors_metadata(path).get(CONFIG_KEY, "{}"))
    except (UserError, ValueError):
        return None
    return config.get("method") if isinstance(config, dict) else None

"""The artifact on disk: safetensors weights whose header carries the whole config.

Nothing here unpickles. A lone ``.safetensors`` file is self-describing; in a directory the header is the
source of truth and ``config.json`` (kept for the Hub) must agree with it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from cmw_transfer.artifact.net import FORMAT_VERSION, CMWNet
from cmw_transfer.atomic import atomic_path
from cmw_transfer.errors import UserError
from cmw_transfer.untrusted import MAX_METADATA_CHARS, loads, read_safetensors

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CURVES_NAME = "curves.png"
ARTIFACT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, CURVES_NAME)  # what a net directory publishes, nothing else
CONFIG_KEY = "cmw_transfer.config"
VERSION_KEY = "cmw_transfer.format_version"
REQUIRED_CONFIG = ("hidden_size", "num_heads", "centers", "format_version")


def expected_shapes(hidden_size: int, num_heads: int) -> dict[str, tuple[int, ...]]:
    return {
        "trunk.weight": (hidden_size, 1),
        "trunk.bias": (hidden_size,),
        "heads.weight": (num_heads, hidden_size),
        "heads.bias": (num_heads,),
    }


def save_net(net: CMWNet, path: Path) -> None:
    """Write the weights with the config in the header, atomically."""
    config = net.config()
    validate_config(config, source=str(path))
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in net.state_dict().items()}
    metadata = {"format": "pt", VERSION_KEY: str(FORMAT_VERSION), CONFIG_KEY: json.dumps(config, sort_keys=True)}
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_header(save(tensors, metadata=metadata)))


def canonical_header(blob: bytes) -> bytes:
    """Re-serialise the JSON header with sorted keys: safetensors writes metadata in hash-map order, and the same
    net must give the same bytes (shipped nets are regenerated bit-exactly)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def _fix_hint(path: Path) -> str:
    return f"re-export it with CMWNet.save_pretrained or re-download it ({path})"


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a safetensors file, with every failure turned into a UserError; the header and the
    config JSON are bounded first (:mod:`cmw_transfer.untrusted`)."""
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"no weights file at {path}: expected a directory holding {WEIGHTS_NAME} "
                        "or a .safetensors file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: {_fix_hint(path)}")
    metadata, tensors = read_safetensors(path, hint=_fix_hint(path))
    if CONFIG_KEY not in metadata:
        raise UserError(f"{path} has no '{CONFIG_KEY}' in its header, so its centers and loss range are unknown: "
                        f"{_fix_hint(path)}")
    try:
        config = loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: the config in the header is not valid JSON ({exc.msg}): {_fix_hint(path)}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: the config in the header is not a JSON object: {_fix_hint(path)}")
    header_version = metadata.get(VERSION_KEY)
    if header_version is not None and str(config.get("format_version")) != header_version:
        raise UserError(f"{path}: header format version {header_version} disagrees with the config's "
                        f"{config.get('format_version')}: {_fix_hint(path)}")
    return config, tensors


def validate_config(config: dict[str, Any], *, source: str) -> None:
    missing = [key for key in REQUIRED_CONFIG if config.get(key) is None]
    if missing:
        raise UserError(f"{source}: config lacks {', '.join(missing)}; a saved net needs its scale centers "
                        "(set them with CMWNet.with_scales)")
    version = config["format_version"]
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{source}: format_version must be a positive integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise UserError(f"{source}: format version {version} is newer than this cmw-transfer supports "
                        f"({FORMAT_VERSION}); upgrade cmw-transfer")
    hidden, heads = config["hidden_size"], config["num_heads"]
    if not all(isinstance(v, int) and v >= 1 for v in (hidden, heads)):
        raise UserError(f"{source}: hidden_size and num_heads must be positive integers, got {_short(hidden)}, "
                        f"{_short(heads)}")
    centers = config["centers"]
    if (not isinstance(centers, list) or len(centers) != heads
            or not all(isinstance(c, int | float) and math.isfinite(c) for c in centers)):
        raise UserError(f"{source}: centers must be {heads} finite numbers (one per head), got {_short(centers)}")
    if any(b <= a for a, b in zip(centers, centers[1:])):
        raise UserError(f"{source}: centers must be strictly ascending (head i = i-th smallest), got "
                        f"{_short(centers)}")
    provenance = config.get("provenance")
    if provenance is not None and not (isinstance(provenance, dict) and all(isinstance(k, str) for k in provenance)):
        raise UserError(f"{source}: provenance must be a JSON object (field -> value), got "
                        f"{type(provenance).__name__} {_short(provenance)}: {_fix_hint(Path(source))}")
    loss_range = config.get("loss_range")
    if loss_range is not None and (not isinstance(loss_range, dict) or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in loss_range.values())):
        raise UserError(f"{source}: loss_range must map names to finite numbers, got {_short(loss_range)}")


def _short(value: Any, limit: int = 60) -> str:
    """A value from an untrusted config, for an error line: JSON, cut at ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_side_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; not UTF-8, not JSON or not an object (``5``, ``null``, a string) is a UserError."""
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_METADATA_CHARS:
            raise UserError(f"{path} is {len(raw)} bytes, far more than a config: {_fix_hint(path.parent)}")
        side = loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: {_fix_hint(path.parent)}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}): {_fix_hint(path.parent)}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(side, dict):
        raise UserError(f"{path} must hold a JSON object, got {_short(side)}: {_fix_hint(path.parent)}")
    return side


def validate_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], *, source: str) -> None:
    shapes = expected_shapes(config["hidden_size"], config["num_heads"])
    if set(tensors) != set(shapes):
        raise UserError(f"{source}: tensors {sorted(tensors)} do not match the expected {sorted(shapes)}")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise UserError(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape} for "
                            f"hidden_size={config['hidden_size']}, num_heads={config['num_heads']}")
        if t.dtype != torch.float32:
            raise UserError(f"{source}: {name} has dtype {t.dtype}, expected torch.float32")
        if not torch.isfinite(t).all():
            raise UserError(f"{source}: {name} contains NaN or inf values; the net is unusable, re-train it")


def load_net(cls: type[CMWNet], path: Path, config_path: Path | None = None) -> CMWNet:
    """Validated load of a directory or a lone .safetensors file; ``config_path`` is the config.json to check
    against the header (default: the one in the directory, if any)."""
    config, tensors = read_header(path)
    source = str(path)
    validate_config(config, source=source)
    validate_tensors(tensors, config, source=source)
    if config_path is None and path.is_dir() and (path / CONFIG_NAME).is_file():
        config_path = path / CONFIG_NAME
    if config_path is not None:
        check_config_agrees(config, read_side_config(config_path), source=source)
    net = cls(**{k: config.get(k) for k in ("hidden_size", "num_heads", "centers", "loss_range", "provenance",
                                            "format_version")})
    net.load_state_dict(tensors, strict=True)
    return net


def check_config_agrees(header: dict[str, Any], side: dict[str, Any], *, source: str) -> None:
    """config.json is for humans and the Hub; it must not contradict the header on what shapes the net."""
    for key in ("hidden_size", "num_heads", "centers", "format_version"):
        if key in side and side[key] != header.get(key):
            raise UserError(f"{source}: config.json says {key}={side[key]!r} but the weights header says "
                            f"{header.get(key)!r}; re-export the net")

"""Readers for bytes that came from elsewhere: weights files, metadata, run records, checkpoints.

Every reader bounds what it parses *before* a library sees it, and every refusal is one ``UserError`` line that
names the file:

- JSON (:func:`loads`): nesting deeper than ``MAX_JSON_DEPTH`` is a ``JSONDecodeError`` like any other bad JSON.
  ``json.loads`` recurses in C, so a 30,000-deep ``[[[...`` is otherwise a ``RecursionError``; a number too long
  for ``int`` (a ``ValueError``, not a decode error) is also turned into one.
- safetensors (:func:`read_safetensors`, :func:`safetensors_metadata`): the 8-byte header length is read here and
  bounded by ``MAX_HEADER_BYTES`` and by the file's size, the header is parsed with :func:`loads`, and every
  metadata value is at most ``MAX_METADATA_CHARS`` long, before the file is handed to safetensors (whose own
  refusals, e.g. ``header too large``, are a ``SafetensorError`` no caller would otherwise expect).
- library warnings (:func:`quiet_warnings`): torch warns about a pickle's protocol *before* refusing it; while an
  untrusted file is read, warnings are dropped so that a refusal is exactly one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmw_transfer.errors import UserError

MAX_HEADER_BYTES = 100 * 2**20  # a weighting net's header is ~1 KB; a ViT's tensor table is well under 1 MB
MAX_JSON_DEPTH = 64  # the deepest config or provenance written by cmw-transfer is 3 levels
MAX_METADATA_CHARS = 16 * 2**20  # one metadata value (the config JSON); a 1 MB provenance note still loads


def _too_deep(text: str | bytes, limit: int, chunk: int = 1 << 22) -> int | None:
    """Offset where ``[``/``{`` nesting outside strings first exceeds ``limit``, or None; linear time, vectorised
    (a 100 MB header is scanned in chunks: no per-character Python loop, no recursion)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if data.count(b"[") + data.count(b"{") <= limit:
        return None
    import re

    import numpy as np

    # an escape (\" or \\) becomes two neutral bytes, so every remaining quote opens or closes a string;
    # UTF-8 continuation bytes are never ASCII, so byte offsets of brackets and quotes are exact
    data = re.sub(rb"\\.", b"__", data, flags=re.DOTALL)
    quotes, depth = 0, 0
    for start in range(0, len(data), chunk):
        raw = np.frombuffer(data, dtype=np.uint8, count=min(chunk, len(data) - start), offset=start)
        is_quote = raw == ord('"')
        inside = (quotes + np.cumsum(is_quote, dtype=np.int64) - is_quote) % 2 == 1
        step = (np.isin(raw, (ord("["), ord("{"))) & ~inside).astype(np.int32)
        step -= np.isin(raw, (ord("]"), ord("}"))) & ~inside
        level = depth + np.cumsum(step, dtype=np.int64)
        over = np.flatnonzero(level > limit)
        if over.size:
            return start + int(over[0])
        quotes += int(is_quote.sum())
        depth = int(level[-1]) if level.size else depth
    return None


def loads(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with bounded nesting; every failure is a ``json.JSONDecodeError`` (a ``ValueError``)."""
    doc = text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")
    at = _too_deep(text, max_depth)
    if at is not None:
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", doc, at)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # int()'s digit limit, invalid UTF-8 in bytes
        reason = "a number too long to read" if "integer string conversion" in str(exc) else \
            " ".join(str(exc).split())[:100]
        raise json.JSONDecodeError(reason, doc, 0) from None


def shorten(text: str, limit: int = 200) -> str:
    """``text``, or its first ``limit`` characters and its length when longer (a 1 MB provenance note)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Drop the warnings libraries raise while reading an untrusted file (torch: "Detected pickle protocol 4");
    the caller reports success or one error line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _UnreadableError(Exception):
    """Why a file is not a safetensors file this toolkit will parse."""


def _header(path: Path) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, bounded before it is read; raises :class:`_UnreadableError`."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _UnreadableError(f"{size} bytes is too short: the file starts with an 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise _UnreadableError(f"its header claims {length} bytes, over the {MAX_HEADER_BYTES}-byte limit: "
                                   "the file is corrupt or hostile")
        if length > size - 8:
            raise _UnreadableError(f"its header claims {length} bytes but only {size - 8} follow: the file is "
                                   "truncated or corrupt")
        raw = fh.read(length)
    try:
        header = loads(raw)
    except json.JSONDecodeError as exc:
        raise _UnreadableError(f"the header is not valid JSON ({exc.msg})") from None
    if not isinstance(header, dict):
        raise _UnreadableError("the header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _UnreadableError("its metadata must map strings to strings")
    for key, value in metadata.items():
        if len(value) > MAX_METADATA_CHARS:
            raise _UnreadableError(f"metadata {shorten(key, 60)!r} is {len(value)} characters long, over the "
                                   f"{MAX_METADATA_CHARS}-character limit")
    return header


def _refusal(label: str, reason: str, hint: str) -> UserError:
    return UserError(f"{label} is not a readable safetensors file ({reason}){': ' + hint if hint else ''}")


def safetensors_metadata(path: str | os.PathLike, label: str | None = None, hint: str = "") -> dict[str, str]:
    """The header's ``__metadata__`` (string -> string), bounded and validated; no tensor is read. ``label``
    names the file in errors (default: the path); ``hint`` (what to do) ends a refusal."""
    path = Path(path)
    label = label or str(path)
    try:
        return dict(_header(path).get("__metadata__") or {})
    except _UnreadableError as exc:
        raise _refusal(label, str(exc), hint) from None
    except OSError as exc:
        raise UserError(f"cannot read {label}: {exc.strerror or exc}") from None


def read_safetensors(path: str | os.PathLike, label: str | None = None,
                     hint: str = "") -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensors) of a safetensors file: the header is bounded here, then safetensors reads the tensors.
    ``label`` and ``hint`` as in :func:`safetensors_metadata`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    label = label or str(path)
    metadata = safetensors_metadata(path, label, hint)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _refusal(label, " ".join(str(exc).split())[:200], hint) from None
    return metadata, tensors

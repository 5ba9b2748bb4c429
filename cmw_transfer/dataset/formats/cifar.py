"""CIFAR-10/100 in the original python-pickle batch format (what ``torchvision`` also downloads).

``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``: dicts with ``b"data"`` (N x 3072 uint8, R/G/B planes of 32x32) and
``b"labels"`` / ``b"fine_labels"``. When the files are missing and ``download`` is on, torchvision fetches them
into ``root``; without a network that fails with a UserError that names ``--data-dir`` and the expected files.

A dataset folder is untrusted input, and a pickle can run any code while it loads. The batches are read by
:class:`CifarUnpickler`, which resolves only what the real files (written by Python 2's cPickle, protocol 2) and
their Python 3 re-pickles hold: dicts, lists, bytes, str, ints, and numpy's array reconstruction restricted to
integer dtypes. Even those never reach numpy's own ``__setstate__``: the array and dtype states are checked and
the array is built with ``np.frombuffer``. Anything else is one error line naming the file, and nothing of it runs.
Malformed content (string labels, a wrong shape, a non-dict) is one error line too.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from cmw_transfer.dataset.base import InMemoryDataset
from cmw_transfer.errors import UserError

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "labels": b"labels", "names": b"label_names",
                "classes": 10, "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "labels": b"fine_labels", "names": b"fine_label_names", "classes": 100,
                 "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"},
}


def default_root() -> Path:
    """``$CMW_DATA_DIR`` or ``~/.cache/cmw_transfer/data``: where downloads go when no --data-dir is given."""
    return Path(os.environ.get("CMW_DATA_DIR") or Path.home() / ".cache" / "cmw_transfer" / "data")


def _folder(name: str, root: Path) -> Path:
    folder = LAYOUT[name]["folder"]
    return root if root.name == folder else root / folder


def _expected(name: str, root: Path) -> list[Path]:
    layout = LAYOUT[name]
    folder = _folder(name, root)
    return [folder / f for f in [*layout["train"], *layout["test"], layout["meta"]]]


def _download(name: str, root: Path) -> str | None:
    """Try torchvision's downloader; return the failure reason or None."""
    try:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(root=str(root), train=True, download=True)
        return None
    except Exception as exc:  # URLError, socket errors, checksum failures...
        return f"{exc.__class__.__name__}: {exc}"


class Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR file never holds."""


class _NDArray:
    """Stands for ``numpy.ndarray`` inside the pickle: only :func:`_reconstruct` accepts it; it builds nothing."""


_NDARRAY = _NDArray()
_BYTE_ORDERS = {"|": "|", "=": "=", "<": "<", ">": ">"}


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _DTypeState:
    """An integer dtype named by the pickle; its state (byte order) is checked here, not by numpy."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        spec = _text(spec)
        if not isinstance(spec, str) or len(spec) > 8:
            raise Refused(f"a dtype spec {repr(spec)[:40]}")
        try:
            self.dtype = np.dtype(spec)
        except (TypeError, ValueError):
            raise Refused(f"dtype {spec!r}") from None
        if self.dtype.kind not in "iu":
            raise Refused(f"dtype {spec!r} (only integer arrays are CIFAR data)")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] != 3 or \
                _text(state[1]) not in _BYTE_ORDERS or any(v is not None for v in state[2:5]):
            raise Refused(f"a dtype state {repr(state)[:60]} (only a plain integer dtype is CIFAR data)")
        order = _BYTE_ORDERS[_text(state[1])]
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayState:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")`` as the pickle calls it; the array is built from
    the checked state with ``np.frombuffer``."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[0], tuple)
                and all(_is_int(n) and n >= 0 for n in state[0]) and isinstance(state[1], _DTypeState)
                and isinstance(state[3], bytes) and self.array is None):
            raise Refused(f"an array state {repr(state)[:60]}")
        shape, dtype = tuple(int(n) for n in state[0]), state[1].dtype
        if len(state[3]) != math.prod(shape) * dtype.itemsize:
            raise Refused(f"an array of shape {shape} with {len(state[3])} bytes of data")
        self.array = np.frombuffer(state[3], dtype=dtype).reshape(shape, order="F" if state[2] else "C")


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> _ArrayState:
    if cls is not _NDARRAY:
        raise Refused(f"_reconstruct of {repr(cls)[:40]} (only numpy.ndarray)")
    return _ArrayState()


def _latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(str, "latin1")``: how a Python 3 protocol-2 pickle stores bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode with {repr(encoding)[:20]} (only the latin1 form of bytes)")
    return text.encode("latin-1")


class CifarUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR batch holds; every other global (and so every ``__reduce__`` payload) is
    refused before it is looked up. dict, list, bytes, str and int need no global at all."""

    ALLOWED: ClassVar[Mapping[tuple[str, str], Any]] = MappingProxyType({
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the original files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x re-pickles
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DTypeState,
        ("_codecs", "encode"): _latin1,
    })

    def find_class(self, module: str, name: str) -> Any:
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise Refused(f"it calls {module[:60]}.{name[:60]}, which no CIFAR file holds")
        return found


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = CifarUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except Refused as exc:
        raise UserError(f"{path}: refused to load it: {exc}; it is not an original CIFAR file (re-download and "
                        "extract it)") from None
    except Exception as exc:  # a corrupt pickle raises anything
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"{path} is not a CIFAR python-pickle batch ({detail}); re-download and extract it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR python-pickle batch (got {type(obj).__name__}, not a dict)")
    return {key: value.array if isinstance(value, _ArrayState) else value for key, value in obj.items()}


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, list | tuple):
        odd = next((v for v in value if not _is_int(v)), None)
        inner = f" holding {type(odd).__name__} {repr(odd)[:40]}" if odd is not None else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return f"{type(value).__name__} {repr(value)[:40]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _batch(batch: dict, path: Path, labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of one batch, or one UserError saying what is wrong."""
    if b"data" not in batch or labels_key not in batch:
        raise UserError(f"{path}: missing b'data' or {labels_key!r}; not a CIFAR batch")
    data, labels = batch[b"data"], batch[labels_key]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iu" or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: b'data' must be an N x 3072 uint8 array, got {_describe(data)}")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise UserError(f"{path}: b'data' holds values outside 0..255; not CIFAR pixels")
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        ok = isinstance(labels, list) and all(_is_int(v) for v in labels)
    if not ok:
        raise UserError(f"{path}: {labels_key!r} must be a list of integer labels, got {_describe(labels)}")
    if len(labels) != data.shape[0]:
        raise UserError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise UserError(f"{path}: {labels_key!r} holds a label too large for any class") from None
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _class_names(meta: dict, path: Path, key: bytes, classes: int) -> list[str] | None:
    names = meta.get(key)
    if names is None:
        return None
    if not isinstance(names, list) or len(names) != classes or not all(isinstance(n, bytes | str) for n in names):
        raise UserError(f"{path}: {key!r} must be a list of {classes} class names, got {_describe(names)}")
    return [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else n for n in names]


def load(name: str, root: str | Path | None, split: str = "train", *, download: bool = True,
         **kwargs: Any) -> InMemoryDataset:
    layout = LAYOUT[name]
    if split not in ("train", "test"):
        raise UserError(f"{name} has splits train, test, not {split!r}")
    root = Path(root).expanduser() if root is not None else default_root()
    if not all(p.exists() for p in _expected(name, root)):
        reason = _download(name, root) if download else "download disabled"
        missing = [p for p in _expected(name, root) if not p.exists()]
        if missing:
            raise UserError(
                f"{name}: expected {', '.join(str(p) for p in missing)} (the python-pickle batches); automatic "
                f"download failed ({reason}). Download {layout['url']}, extract it and pass --data-dir DIR "
                f"(the folder containing {layout['folder']}/)")
    folder = _folder(name, root)
    data, labels = [], []
    for batch_name in layout[split]:
        x, y = _batch(_unpickle(folder / batch_name), folder / batch_name, layout["labels"])
        data.append(x)
        labels.append(y)
    y = np.concatenate(labels)
    bad = np.flatnonzero((y < 0) | (y >= layout["classes"]))
    if bad.size:
        raise UserError(f"{name} {split}: label {int(y[bad[0]])} at sample {int(bad[0])} is outside "
                        f"0..{layout['classes'] - 1}; the batch files are corrupt")
    names = _class_names(_unpickle(folder / layout["meta"]), folder / layout["meta"], layout["names"],
                         layout["classes"])
    return InMemoryDataset(name, np.ascontiguousarray(np.concatenate(data)), y, layout["classes"], clean_targets=y,
                           classes=names, root=root, split=split, **kwargs)

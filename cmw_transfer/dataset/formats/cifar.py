"""CIFAR-10/100 in the original python-pickle batch format (what ``torchvision`` also downloads).

``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``: dicts with ``b"data"`` (N x 3072 uint8, R/G/B planes of 32x32) and
``b"labels"`` / ``b"fine_labels"``, read with ``pickle.load(f, encoding="bytes")``. When the files are
missing and ``download`` is on, torchvision fetches them into ``root``; without a network that fails with a
UserError that names ``--data-dir`` and the expected files.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

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


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except Exception as exc:  # a corrupt pickle raises anything
        raise UserError(f"{path} is not a CIFAR python-pickle batch ({exc}); re-download and extract it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR python-pickle batch (got {type(obj).__name__})")
    return obj


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
        batch = _unpickle(folder / batch_name)
        if b"data" not in batch or layout["labels"] not in batch:
            raise UserError(f"{folder / batch_name}: missing b'data' or {layout['labels']!r}; not a {name} batch")
        x = np.asarray(batch[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != len(batch[layout["labels"]]):
            raise UserError(f"{folder / batch_name}: data must be N x 3072 uint8 with N labels, got {x.shape}")
        data.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[layout["labels"]], dtype=np.int64))
    y = np.concatenate(labels)
    bad = np.flatnonzero((y < 0) | (y >= layout["classes"]))
    if bad.size:
        raise UserError(f"{name} {split}: label {int(y[bad[0]])} at sample {int(bad[0])} is outside "
                        f"0..{layout['classes'] - 1}; the batch files are corrupt")
    meta = _unpickle(folder / layout["meta"])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(layout["names"], [])] or None
    return InMemoryDataset(name, np.ascontiguousarray(np.concatenate(data)), y, layout["classes"], clean_targets=y,
                           classes=names, root=root, split=split, **kwargs)

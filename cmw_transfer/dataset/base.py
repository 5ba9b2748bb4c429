"""The one dataset type every stage sees: observed labels, optional ground truth, and lazy sample loading.

Samples live in a *store* (an in-memory array or a table of image paths) that views share: ``subset`` and
``with_targets`` copy only the label vectors and a row map, never images, so slicing a 2.4M-sample web
dataset is cheap.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from cmw_transfer.dataset.images import skip_unreadable_collate
from cmw_transfer.errors import UserError


def _as_targets(values: Sequence[int] | np.ndarray, num_classes: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise UserError(f"{what} must be a 1-D integer vector, got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=True)
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise UserError(f"{what}[{int(bad[0])}] = {int(arr[bad[0]])} is outside 0..{num_classes - 1}")
    return arr


class LabeledDataset(Dataset):
    """A labelled image dataset: ``ds[i] -> (image tensor, observed label, i)``.

    ``targets`` are the observed (possibly noisy) labels; ``clean_targets`` the ground truth when it is known
    (synthetic noise), ``None`` for real web data. Subclasses implement :meth:`_load` for a store row.
    """

    in_memory: ClassVar[bool] = False  # every sample in one array (``features()``): what eta's exact knn needs
    collate = staticmethod(skip_unreadable_collate)  # batches of the samples whose image could be read

    def __init__(
        self,
        name: str,
        targets: Sequence[int] | np.ndarray,
        num_classes: int,
        *,
        clean_targets: Sequence[int] | np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        root: Path | None = None,
        split: str = "train",
    ) -> None:
        self.name = name
        self.num_classes = int(num_classes)
        self.targets = _as_targets(targets, self.num_classes, "targets")
        self.clean_targets = None if clean_targets is None else self._aligned(clean_targets, "clean_targets")
        self.classes = list(classes) if classes is not None else None
        self.transform = transform
        self.root = None if root is None else Path(root)
        self.split = split
        self.rows = np.arange(self.targets.size, dtype=np.int64)  # position in the store of each sample
        self.bias = None  # the BiasSpec applied by apply_bias, if any
        self.bias_log: tuple[dict, ...] = ()

    def _aligned(self, values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
        arr = _as_targets(values, self.num_classes, what)
        if arr.size != self.targets.size:
            raise UserError(f"{what} has {arr.size} entries for {self.targets.size} samples")
        return arr

    # --- the torch Dataset protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.targets.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int]:
        """``(image, observed label, i)``; the image is ``None`` only for an unreadable file (non-strict)."""
        i = int(i)
        return self._load(int(self.rows[i])), int(self.targets[i]), i

    def _load(self, row: int) -> torch.Tensor | None:
        raise NotImplementedError

    # --- labels and views -----------------------------------------------------------------------------
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.targets, minlength=self.num_classes).astype(np.int64)

    def labels_digest(self) -> str:
        """A 16-hex-digit fingerprint of which samples carry which label: compare it across machines.

        sha256 over the class count, the store rows and the observed labels (int64, little endian). Biased
        labels are built to be bit-identical on every machine, so two machines that disagree here are not
        training on the same data.
        """
        h = hashlib.sha256(b"cmw-transfer labels v1")
        h.update(np.int64(self.num_classes).astype("<i8").tobytes())
        h.update(np.ascontiguousarray(self.rows, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.targets, dtype="<i8").tobytes())
        return h.hexdigest()[:16]

    def noise_rate(self) -> float | None:
        """Realised fraction of observed labels that differ from the ground truth; ``None`` when unknown."""
        if self.clean_targets is None or not len(self):
            return None
        return float(np.mean(self.targets != self.clean_targets))

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledDataset:
        """A view of the samples at ``indices`` (in that order); labels and ground truth stay aligned."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise UserError(f"subset index out of range for a dataset of {len(self)} samples")
        view = copy.copy(self)
        view.rows = self.rows[idx]
        view.targets = self.targets[idx]
        view.clean_targets = None if self.clean_targets is None else self.clean_targets[idx]
        return view

    def with_targets(
        self, targets: Sequence[int] | np.ndarray, clean_targets: Sequence[int] | np.ndarray | None = None
    ) -> LabeledDataset:
        """Same samples, new observed labels; ``clean_targets=None`` keeps the current ground truth."""
        view = copy.copy(self)
        view.targets = self._aligned(targets, "targets")
        if clean_targets is not None:
            view.clean_targets = self._aligned(clean_targets, "clean_targets")
        return view

    def unreadable_count(self) -> int:
        """Images skipped because they could not be decoded (0 for in-memory data)."""
        return 0

    def describe(self) -> str:
        return f"{self.name} [{self.split}]: {len(self)} samples, {self.num_classes} classes"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class InMemoryDataset(LabeledDataset):
    """Images held in one array: float CHW in [0, 1] (digits) or uint8 HWC (CIFAR, the MNIST family with C = 1).

    Without a transform a sample is a float32 CHW tensor in [0, 1]; with one, the transform gets a PIL image
    (RGB, like torchvision's CIFAR datasets and decoded files), so timm transforms work unchanged.
    """

    in_memory = True

    def __init__(self, name: str, data: np.ndarray, targets: np.ndarray, num_classes: int, **kwargs: Any) -> None:
        super().__init__(name, targets, num_classes, **kwargs)
        if data.shape[0] != self.targets.size:
            raise UserError(f"{name}: {data.shape[0]} images for {self.targets.size} labels")
        self.data = data

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of an untransformed sample."""
        if self.data.dtype == np.uint8:
            h, w, c = self.data.shape[1:]
            return (int(c), int(h), int(w))
        return tuple(int(v) for v in self.data.shape[1:])  # type: ignore[return-value]

    def features(self) -> np.ndarray:
        """All samples as a float ``[N, D]`` matrix in [0, 1] (for scikit-learn models)."""
        x = self.data[self.rows]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return x.reshape(len(self), -1)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        """A DataLoader batch in one vectorised conversion (the same values as ``ds[i]`` one by one).

        Without a transform, converting 128 small images one at a time costs more than the copy itself: at 60,000
        28x28 images the per-sample path made the loader 4x slower than a loop over ready float tensors.
        """
        if self.transform is not None:
            return [self[i] for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        x = self.data[self.rows[idx]]
        if x.dtype == np.uint8:
            batch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().div_(255.0)
        else:
            batch = torch.from_numpy(np.asarray(x, dtype=np.float32))
        return list(zip(batch.unbind(0), self.targets[idx].tolist(), idx.tolist(), strict=True))

    def _load(self, row: int) -> torch.Tensor:
        x = self.data[row]
        if self.transform is not None:
            from PIL import Image

            if x.dtype == np.uint8:  # grey (H x W x 1) becomes RGB, like a decoded grey file
                img = Image.fromarray(x[:, :, 0]).convert("RGB") if x.shape[2] == 1 else Image.fromarray(x)
            else:
                gray = Image.fromarray(np.clip(x[0] * 255.0 + 0.5, 0, 255).astype(np.uint8))
                img = gray.convert("RGB")  # like a decoded file, so ImageNet-style transforms apply
            return self.transform(img)
        if x.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float().div_(255.0)
        return torch.from_numpy(np.array(x, dtype=np.float32))


class PathTable:
    """Relative image paths kept as spans of one byte buffer: no Python string per sample until it is used."""

    def __init__(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: Path) -> None:
        self.buf, self.starts, self.ends, self.base = buf, starts.astype(np.int64), ends.astype(np.int64), Path(base)

    @classmethod
    def from_strings(cls, paths: Sequence[str], base: Path) -> PathTable:
        encoded = [p.encode("utf-8") for p in paths]
        lengths = np.array([len(p) for p in encoded], dtype=np.int64)
        ends = np.cumsum(lengths)
        buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return cls(buf, ends - lengths, ends, base)

    @classmethod
    def concat(cls, tables: Sequence[PathTable]) -> PathTable:
        if len({t.base for t in tables}) > 1:
            raise ValueError("cannot concatenate path tables with different base folders")
        offsets = np.cumsum([0] + [t.buf.size for t in tables[:-1]])
        return cls(np.concatenate([t.buf for t in tables]),
                   np.concatenate([t.starts + o for t, o in zip(tables, offsets, strict=True)]),
                   np.concatenate([t.ends + o for t, o in zip(tables, offsets, strict=True)]), tables[0].base)

    def take(self, idx: np.ndarray) -> PathTable:
        return PathTable(self.buf, self.starts[idx], self.ends[idx], self.base)

    def relative(self, i: int) -> str:
        return self.buf[self.starts[i]:self.ends[i]].tobytes().decode("utf-8", errors="surrogateescape")

    def __getitem__(self, i: int) -> Path:
        return self.base / self.relative(i)

    def __len__(self) -> int:
        return int(self.starts.size)


class FileDataset(LabeledDataset):
    """Images decoded from files on demand with PIL; unreadable files are skipped and counted, or fatal.

    With ``strict=False`` a file that fails to decode yields ``None`` as image (dropped by
    :func:`~cmw_transfer.dataset.images.skip_unreadable_collate`), a warning, and one more in
    :meth:`unreadable_count`; the counter lives in shared memory so DataLoader workers add to the same total.
    With ``strict=True`` it raises a UserError naming the file.
    """

    def __init__(self, name: str, paths: PathTable, targets: np.ndarray, num_classes: int, *,
                 strict: bool = False, **kwargs: Any) -> None:
        super().__init__(name, targets, num_classes, **kwargs)
        if len(paths) != self.targets.size:
            raise UserError(f"{name}: {len(paths)} paths for {self.targets.size} labels")
        self.paths = paths
        self.strict = strict
        self._unreadable = multiprocessing.Value("q", 0)

    def path(self, i: int) -> Path:
        """File of sample ``i``."""
        return self.paths[int(self.rows[int(i)])]

    def _load(self, row: int) -> torch.Tensor | None:
        from cmw_transfer.dataset.images import default_transform, load_image

        path = self.paths[row]
        try:
            img = load_image(path)
        except Exception as exc:  # PIL raises many types for a bad file
            if self.strict:
                raise UserError(f"cannot read image {path}: {exc}; fix or remove it, or drop --strict to skip "
                                "unreadable images") from None
            with self._unreadable.get_lock():
                self._unreadable.value += 1
            warnings.warn(f"skipping unreadable image {path} ({exc.__class__.__name__})", stacklevel=2)
            return None
        transform = self.transform if self.transform is not None else default_transform(self.split)
        return transform(img)

    def unreadable_count(self) -> int:
        return int(self._unreadable.value)

    def __getstate__(self) -> dict:
        # A shared counter can only travel to a child process being started; a plain pickle gets a fresh one.
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_unreadable"] = int(self._unreadable.value)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("_unreadable"), int):
            state["_unreadable"] = multiprocessing.Value("q", state["_unreadable"])
        self.__dict__.update(state)

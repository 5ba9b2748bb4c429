"""WebVision 1.0: ``info/train_filelist_google.txt``, ``info/train_filelist_flickr.txt``, ``info/val_filelist.txt``.

Lines are ``relative/path label``. Training paths are relative to the root (``google/q0001/...``); validation
lines name files inside ``val_images_256/`` (the DivideMix / CMW-Net loaders' layout), unless a line already
starts with that folder. ``webvision-full`` is Google + Flickr (1000 classes); ``mini-webvision`` is the
Google part restricted to the first 50 classes (the standard mini-WebVision protocol), same for val.
Labels are web labels: no ground truth, ``clean_targets`` is ``None``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmw_transfer.dataset.base import FileDataset, PathTable
from cmw_transfer.dataset.classes import check_no_empty_classes
from cmw_transfer.dataset.lists import parse_label_list, require_files
from cmw_transfer.errors import UserError

GOOGLE = "info/train_filelist_google.txt"
FLICKR = "info/train_filelist_flickr.txt"
VAL = "info/val_filelist.txt"
VAL_IMAGES = "val_images_256"
NUM_CLASSES = 1000
MINI_CLASSES = 50


def _class_names(root: Path, num_classes: int) -> list[str] | None:
    synsets = root / "info" / "synsets.txt"
    if not synsets.exists():
        return None
    names = [line.strip() for line in synsets.read_text("utf-8-sig", errors="replace").splitlines() if line.strip()]
    return names[:num_classes] if len(names) >= num_classes else None


def load(name: str, root: str | Path | None, split: str = "train", *, allow_empty_classes: bool = False,
         **kwargs: Any) -> FileDataset:
    if root is None:
        raise UserError(f"{name} needs --data-dir DIR: the WebVision root holding {GOOGLE}, {FLICKR}, {VAL} and the "
                        "image folders")
    root = Path(root).expanduser()
    mini = name == "mini-webvision"
    num_classes = MINI_CLASSES if mini else NUM_CLASSES
    if split == "train":
        files = [GOOGLE] if mini else [GOOGLE, FLICKR]
        require_files(name, root, files)
        parsed = [parse_label_list(root / f, root, num_classes=NUM_CLASSES) for f in files]
        paths = PathTable.concat([p.paths for p in parsed])
        labels = np.concatenate([p.labels for p in parsed])
    elif split in ("val", "test"):
        require_files(name, root, [VAL])
        parsed_val = parse_label_list(root / VAL, root / VAL_IMAGES, num_classes=NUM_CLASSES)
        paths, labels = parsed_val.paths, parsed_val.labels
        first = paths.relative(0) if len(paths) else ""
        if first.startswith(VAL_IMAGES + "/"):
            paths = PathTable(paths.buf, paths.starts, paths.ends, root)
    else:
        raise UserError(f"{name} has splits train, val, not {split!r}")
    if mini:
        keep = np.flatnonzero(labels < num_classes)
        paths, labels = paths.take(keep), labels[keep]
    check_no_empty_classes(labels, num_classes, f"{name} {split} ({root})", allow=allow_empty_classes)
    return FileDataset(name, paths, labels, num_classes, classes=_class_names(root, num_classes), root=root,
                       split=split, **kwargs)

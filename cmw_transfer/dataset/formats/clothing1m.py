"""Clothing1M (Xiao et al. 2015): key/label list files at the root, images under ``root/images/...``.

``noisy_label_kv.txt`` / ``clean_label_kv.txt`` hold ``images/x/yy/name.jpg label`` lines; the key lists
(``noisy_train_key_list.txt``, ``clean_train_key_list.txt``, ``clean_val_key_list.txt``,
``clean_test_key_list.txt``) pick the samples of each split. ``train`` = noisy keys with noisy labels (no
ground truth: ``clean_targets`` None); ``clean-train`` / ``val`` / ``test`` = clean keys with clean labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmw_transfer.dataset.base import FileDataset
from cmw_transfer.dataset.classes import check_no_empty_classes
from cmw_transfer.dataset.lists import parse_key_list, parse_label_list, require_files
from cmw_transfer.errors import UserError

NUM_CLASSES = 14
SPLITS = {
    "train": ("noisy_train_key_list.txt", "noisy_label_kv.txt"),
    "clean-train": ("clean_train_key_list.txt", "clean_label_kv.txt"),
    "val": ("clean_val_key_list.txt", "clean_label_kv.txt"),
    "test": ("clean_test_key_list.txt", "clean_label_kv.txt"),
}


def _class_names(root: Path) -> list[str] | None:
    path = root / "category_names_eng.txt"
    if not path.exists():
        return None
    names = [line.strip() for line in path.read_text("utf-8-sig", errors="replace").splitlines() if line.strip()]
    return names if len(names) == NUM_CLASSES else None


def load(root: str | Path | None, split: str = "train", *, allow_empty_classes: bool = False,
         **kwargs: Any) -> FileDataset:
    if split not in SPLITS:
        raise UserError(f"clothing1m has splits {', '.join(SPLITS)}, not {split!r}")
    key_file, kv_file = SPLITS[split]
    if root is None:
        raise UserError(f"clothing1m needs --data-dir DIR: the folder holding {kv_file}, {key_file} and images/")
    root = Path(root).expanduser()
    require_files("clothing1m", root, [kv_file, key_file])
    kv = parse_label_list(root / kv_file, root, num_classes=NUM_CLASSES)
    keys = parse_key_list(root / key_file, root)
    label_of = {kv.paths.relative(k): int(v) for k, v in enumerate(kv.labels)}
    labels = np.empty(len(keys.paths), dtype=np.int64)
    for k in range(len(keys.paths)):
        key = keys.paths.relative(k)
        label = label_of.get(key)
        if label is None:
            raise UserError(f"{keys.source}:{int(keys.line_numbers[k])}: key {key!r} has no label in {kv.source}")
        labels[k] = label
    check_no_empty_classes(labels, NUM_CLASSES, f"clothing1m {split} ({root})", allow=allow_empty_classes)
    return FileDataset("clothing1m", keys.paths, labels, NUM_CLASSES, classes=_class_names(root), root=root,
                       split=split, **kwargs)

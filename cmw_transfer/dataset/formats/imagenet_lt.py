"""ImageNet-LT (Liu et al. 2019): ``ImageNet_LT_{train,val,test,open}.txt`` with ``relative/path label`` lines.

The list files are looked up in the root and in ``root/ImageNet_LT/``; image paths (``train/n01440764/...``)
are relative to the root, i.e. the ImageNet folder holding ``train/`` and ``val/``. The ``open`` split is the
open-set images: any label outside 0..999 there becomes class 1000 ("unknown"), so that split has 1001
classes. Labels are curated ImageNet labels, but no separate ground truth exists: ``clean_targets`` is None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmw_transfer.dataset.base import FileDataset
from cmw_transfer.dataset.classes import check_no_empty_classes
from cmw_transfer.dataset.lists import parse_label_list
from cmw_transfer.errors import UserError

NUM_CLASSES = 1000
SPLITS = ("train", "val", "test", "open")


def list_file(root: Path, split: str) -> Path:
    name = f"ImageNet_LT_{split}.txt"
    for candidate in (root / name, root / "ImageNet_LT" / name):
        if candidate.exists():
            return candidate
    raise UserError(f"imagenet-lt: expected {root / name} or {root / 'ImageNet_LT' / name} (missing); pass "
                    "--data-dir DIR pointing at the ImageNet root that holds train/, val/ and the ImageNet_LT_*.txt "
                    "lists")


def load(root: str | Path | None, split: str = "train", *, allow_empty_classes: bool = False,
         **kwargs: Any) -> FileDataset:
    if root is None:
        raise UserError("imagenet-lt needs --data-dir DIR: the ImageNet root with train/, val/ and "
                        "ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt")
    if split not in SPLITS:
        raise UserError(f"imagenet-lt has splits {', '.join(SPLITS)}, not {split!r}")
    root = Path(root).expanduser()
    source = list_file(root, split)
    if split == "open":
        parsed = parse_label_list(source, root, check_range=False)
        labels = np.where((parsed.labels >= 0) & (parsed.labels < NUM_CLASSES), parsed.labels, NUM_CLASSES)
        return FileDataset("imagenet-lt", parsed.paths, labels, NUM_CLASSES + 1, root=root, split=split, **kwargs)
    parsed = parse_label_list(source, root, num_classes=NUM_CLASSES)
    check_no_empty_classes(parsed.labels, NUM_CLASSES, f"imagenet-lt {split} ({source})",
                           allow=allow_empty_classes)
    return FileDataset("imagenet-lt", parsed.paths, parsed.labels, NUM_CLASSES, root=root, split=split, **kwargs)

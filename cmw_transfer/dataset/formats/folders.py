"""Directory-scanned formats: Animal-10N (label in the file name) and ``folder:PATH`` (one folder per class)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from cmw_transfer.dataset.base import FileDataset, PathTable
from cmw_transfer.dataset.classes import check_no_empty_classes
from cmw_transfer.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ANIMAL_SPLITS = {"train": "training", "test": "testing"}
ANIMAL_CLASSES = 10
_ANIMAL_NAME = re.compile(r"^(\d+)_[^/]+$")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_animal10n(root: str | Path | None, split: str = "train", *, allow_empty_classes: bool = False,
                   **kwargs: Any) -> FileDataset:
    """Animal-10N (Song et al. 2019): ``training/`` and ``testing/`` with files named ``<label>_<id>.jpg``.

    The labels are the dataset's (noisy, ~8%) labels; there is no ground truth, so ``clean_targets`` is None.
    """
    if split not in ANIMAL_SPLITS:
        raise UserError(f"animal-10n has splits {', '.join(ANIMAL_SPLITS)}, not {split!r}")
    folder_name = ANIMAL_SPLITS[split]
    if root is None:
        raise UserError(f"animal-10n needs --data-dir DIR: the folder holding {folder_name}/ with <label>_<id>.jpg")
    root = Path(root).expanduser()
    folder = root / folder_name
    if not folder.is_dir():
        raise UserError(f"animal-10n: expected the folder {folder} (missing) with files named <label>_<id>.jpg; pass "
                        "--data-dir DIR pointing at the folder that holds training/ and testing/")
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and _is_image(entry.name))
    labels = np.empty(len(names), dtype=np.int64)
    for k, name in enumerate(names):
        match = _ANIMAL_NAME.match(name)
        if not match:
            raise UserError(f"animal-10n: file name {folder / name} does not follow <label>_<id>.jpg")
        labels[k] = int(match.group(1))
        if labels[k] >= ANIMAL_CLASSES:
            raise UserError(f"animal-10n: label {labels[k]} of {folder / name} is outside 0..{ANIMAL_CLASSES - 1}")
    check_no_empty_classes(labels, ANIMAL_CLASSES, f"animal-10n {split} ({folder})", allow=allow_empty_classes)
    return FileDataset("animal-10n", PathTable.from_strings(names, folder), labels, ANIMAL_CLASSES, root=root,
                       split=split, **kwargs)


def folder_root(path: str | Path) -> Path:
    """The folder of ``folder:PATH``, which must exist (checked before anything else about the run)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"folder:{path}: {root} is not a folder; expected one sub-folder per class with images")
    return root


def list_file(path: str | Path) -> Path:
    """The list file of ``list:PATH``, which must exist (checked before anything else about the run)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise UserError(f"list:{path}: list file {source} not found; expected lines 'relative/path label'")
    return source


def load_folder(path: str | Path, split: str = "train", *, allow_empty_classes: bool = False,
                **kwargs: Any) -> FileDataset:
    """``folder:PATH``: each sub-folder of PATH is a class (sorted names -> labels 0..C-1), images inside it
    (recursively); like torchvision's ImageFolder. An empty class folder is an error."""
    root = folder_root(path)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"folder:{path}: no class sub-folders in {root}; expected {root}/<class>/<image>.jpg")
    rel_paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            found.extend(os.path.join(rel_dir, f) for f in sorted(filenames) if _is_image(f))
        if not found and not allow_empty_classes:
            raise UserError(f"folder:{path}: class folder {root / cls} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        rel_paths.extend(found)
        labels.extend([label] * len(found))
    y = np.asarray(labels, dtype=np.int64)
    check_no_empty_classes(y, len(classes), f"folder:{path}", allow=allow_empty_classes)
    return FileDataset(f"folder:{path}", PathTable.from_strings(rel_paths, root), y, len(classes), classes=classes,
                       root=root, split=split, **kwargs)


def load_list(path: str | Path, root: str | Path | None = None, split: str = "train", *,
              allow_empty_classes: bool = False, **kwargs: Any) -> FileDataset:
    """``list:PATH``: ``relative/path label`` lines; paths are relative to ``root`` (``--data-dir``) when given,
    else to the list file's folder. Classes are 0..max label (at most ``MAX_LIST_CLASSES``); a class with no
    line is an error unless ``allow_empty_classes``."""
    from cmw_transfer.dataset.lists import MAX_LIST_CLASSES, parse_label_list

    source = list_file(path)
    base = Path(root).expanduser() if root is not None else source.parent
    parsed = parse_label_list(source, base)
    if not parsed.labels.size:
        raise UserError(f"list:{path}: {source} has no 'relative/path label' lines")
    top = int(np.argmax(parsed.labels))
    num_classes = int(parsed.labels[top]) + 1
    if num_classes > MAX_LIST_CLASSES:
        raise UserError(f"{source}:{int(parsed.line_numbers[top])}: label {num_classes - 1} is out of range (a list "
                        f"names classes 0..{MAX_LIST_CLASSES - 1}); labels must be class indices 0..C-1")
    check_no_empty_classes(parsed.labels, num_classes, f"list:{path} ({source})", allow=allow_empty_classes)
    return FileDataset(f"list:{path}", parsed.paths, parsed.labels, num_classes, root=base, split=split, **kwargs)

"""Image decoding (PIL), timm transforms, and the collate function that drops unreadable images."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import default_collate

DEFAULT_INPUT_SIZE = 224


def load_image(path: str | Path):  # -> PIL.Image.Image (PIL imported lazily)
    """Decode an image file fully (so truncated files fail here, not later) as RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


@functools.lru_cache(maxsize=16)
def default_transform(split: str = "train", input_size: int = DEFAULT_INPUT_SIZE) -> Callable:
    """timm's standard transform: RandomResizedCrop + flip for ``train``, resize + center crop otherwise."""
    from timm.data import create_transform

    return create_transform(input_size=input_size, is_training=(split == "train"))


def make_transform(split: str = "train", input_size: int = DEFAULT_INPUT_SIZE, **timm_kwargs) -> Callable:
    """A fresh timm transform with custom options (``create_transform`` keyword arguments)."""
    from timm.data import create_transform

    return create_transform(input_size=input_size, is_training=(split == "train"), **timm_kwargs)


_SKIPPED = {"count": 0}


def skip_unreadable_collate(batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``default_collate`` for ``(image, label, index)`` samples, minus those whose image is ``None``.

    Returns ``(images, labels, indices)``; a batch where every image failed gives empty tensors. Drops are
    added to :func:`skipped_in_collate` (this process only); the dataset's ``unreadable_count()`` is the
    total across DataLoader workers.
    """
    kept = [sample for sample in batch if sample[0] is not None]
    _SKIPPED["count"] += len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return default_collate(kept)


def skipped_in_collate(reset: bool = False) -> int:
    """Samples dropped by :func:`skip_unreadable_collate` in this process (optionally resetting the count)."""
    count = _SKIPPED["count"]
    if reset:
        _SKIPPED["count"] = 0
    return count

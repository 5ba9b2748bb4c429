"""scikit-learn's shipped 8x8 digits: the embedded default dataset (no download, no files)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cmw_transfer.dataset.base import InMemoryDataset
from cmw_transfer.errors import UserError

SPLIT_SEED = 0
TEST_FRACTION = 0.25
SPLITS = ("train", "test")


def load(root: Any = None, split: str = "train", **kwargs: Any) -> InMemoryDataset:
    """1797 digits as float32 [1, 8, 8] in [0, 1]; a fixed stratified 75/25 train/test split (seed 0).

    ``clean_targets`` are set: the shipped labels are the ground truth, so injected noise can be measured.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in SPLITS:
        raise UserError(f"digits has splits {', '.join(SPLITS)}, not {split!r}")
    bunch = load_digits()
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(y.size), test_size=TEST_FRACTION, stratify=y,
                                           random_state=SPLIT_SEED)
    idx = np.sort(train_idx if split == "train" else test_idx)
    data = (bunch.images[idx] / 16.0).astype(np.float32)[:, None, :, :]
    return InMemoryDataset("digits", data, y[idx], 10, clean_targets=y[idx], classes=[str(d) for d in range(10)],
                           split=split, **kwargs)

"""What the bias generators need of a dataset. :class:`cmw_transfer.dataset.LabeledDataset` is one; the protocol keeps
``bias`` below ``dataset``, which applies it (``create_dataset(..., noise=...)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Labeled(Protocol):
    """Observed labels (and the ground truth when known) over a store of samples, ``ds[i] -> (x, label, i)``."""

    name: str
    split: str
    num_classes: int
    targets: np.ndarray
    clean_targets: np.ndarray | None
    rows: np.ndarray
    bias: Any
    bias_log: tuple[dict, ...]
    in_memory: bool  # every sample in one array: ``features()`` works (eta's exact knn)

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Any, int, int]: ...

    def subset(self, indices: Sequence[int] | np.ndarray) -> Labeled: ...

    def with_targets(self, targets: Sequence[int] | np.ndarray,
                     clean_targets: Sequence[int] | np.ndarray | None = None) -> Labeled: ...

    def features(self) -> np.ndarray: ...

    def collate(self, batch: Sequence[tuple]) -> Any: ...

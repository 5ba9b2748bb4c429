"""``eta``: per-sample class probabilities from a classifier trained on the *clean* labels (PMD's input).

* ``sklearn`` (default for small in-memory data such as digits): multinomial logistic regression,
  out-of-fold probabilities from stratified K-fold, so no sample is scored by a model that saw it. Takes a
  fraction of a second on digits.
* ``torch`` (default otherwise, any dataset incl. image files): a small CNN trained for a few epochs and
  scored on its own training samples in eval mode, like PLC (which records eta during its last epoch).
  Expensive, so the result is cached as ``.npy`` under ``cache_dir`` (default ``$CMW_CACHE_DIR`` or
  ``~/.cache/cmw_transfer/eta``), keyed by the dataset, its labels and the options.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmw_transfer.atomic import atomic_path
from cmw_transfer.errors import UserError

if TYPE_CHECKING:
    from cmw_transfer.dataset.base import LabeledDataset

SKLEARN_MAX_FEATURES = 4096
SKLEARN_MAX_SAMPLES = 20000


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMW_CACHE_DIR") or Path.home() / ".cache" / "cmw_transfer") / "eta"


def _clean_labels(ds: LabeledDataset) -> np.ndarray:
    return ds.clean_targets if ds.clean_targets is not None else ds.targets


def _cache_key(ds: LabeledDataset, options: dict) -> str:
    h = hashlib.sha256(json.dumps({**options, "name": ds.name, "split": ds.split, "n": len(ds),
                                   "classes": ds.num_classes}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(_clean_labels(ds)).tobytes())
    h.update(np.ascontiguousarray(ds.rows).tobytes())
    return h.hexdigest()[:20]


def _sklearn_eta(ds: LabeledDataset, folds: int, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    x, y = ds.features(), _clean_labels(ds)
    present = np.unique(y)
    eta = np.zeros((len(ds), ds.num_classes), dtype=np.float64)
    if present.size < 2:
        eta[np.arange(len(ds)), y] = 1.0
        return eta
    clf = LogisticRegression(max_iter=1000)
    n_splits = int(min(folds, np.bincount(y)[present].min()))
    with threadpool_limits(1):  # BLAS threads on tiny matrices cost 30x more than they save
        if n_splits >= 2:
            cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            proba = cross_val_predict(clf, x, y, cv=cv, method="predict_proba")
        else:  # some class has a single sample: in-sample probabilities
            proba = clf.fit(x, y).predict_proba(x)
    eta[:, present] = proba
    return eta


def _small_cnn(in_channels: int, num_classes: int):  # -> torch.nn.Module (torch imported lazily)
    from torch import nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(in_channels, 32), nn.MaxPool2d(2, ceil_mode=True), *block(32, 64),
                         nn.MaxPool2d(2, ceil_mode=True), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def _torch_eta(ds: LabeledDataset, epochs: int, seed: int, batch_size: int, num_workers: int) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader

    from cmw_transfer.dataset.images import skip_unreadable_collate

    torch.manual_seed(seed)
    clean = torch.as_tensor(_clean_labels(ds))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=skip_unreadable_collate, generator=torch.Generator().manual_seed(seed))
    from tqdm.auto import tqdm

    model = None
    desc = f"eta for {ds.name}: training a small CNN on the clean labels (cached afterwards)"
    for _ in tqdm(range(max(int(epochs), 1)), desc=desc, unit="epoch", disable=None):
        for x, _observed, idx in loader:
            if not idx.numel():
                continue
            if model is None:
                model = _small_cnn(x.shape[1], ds.num_classes)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                model.train()
            loss = torch.nn.functional.cross_entropy(model(x), clean[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    eta = np.zeros((len(ds), ds.num_classes), dtype=np.float64)
    eta[np.arange(len(ds)), clean.numpy()] = 1.0  # stays one-hot only for samples whose image is unreadable
    if model is None:
        return eta
    model.eval()
    scoring = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                         collate_fn=skip_unreadable_collate)
    with torch.no_grad():
        for x, _observed, idx in scoring:
            if idx.numel():
                eta[idx.numpy()] = torch.softmax(model(x), dim=1).double().numpy()
    return eta


def estimate_eta(
    ds: LabeledDataset,
    *,
    method: str = "auto",
    folds: int = 5,
    epochs: int = 10,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
) -> np.ndarray:
    """``[len(ds), num_classes]`` class probabilities from a classifier trained on the clean labels.

    ``method``: ``"sklearn"``, ``"torch"`` or ``"auto"`` (sklearn for in-memory data with at most
    4096 features and 20000 samples, torch otherwise). See the module docstring for caching.
    """
    from cmw_transfer.dataset.base import InMemoryDataset

    if method == "auto":
        small = isinstance(ds, InMemoryDataset) and int(np.prod(ds.input_shape)) <= SKLEARN_MAX_FEATURES
        method = "sklearn" if small and len(ds) <= SKLEARN_MAX_SAMPLES else "torch"
    if method not in ("sklearn", "torch"):
        raise UserError(f"eta method must be 'auto', 'sklearn' or 'torch', got {method!r}")
    if method == "sklearn" and not isinstance(ds, InMemoryDataset):
        raise UserError(f"eta method 'sklearn' needs an in-memory dataset; {ds.name} is read from files, use 'torch'")
    if not len(ds):
        raise UserError(f"{ds.name}: cannot estimate eta on an empty dataset")
    options = {"method": method, "seed": seed, **({"folds": folds} if method == "sklearn" else {"epochs": epochs})}
    if cache_dir is None and method == "torch":
        cache_dir = default_cache_dir()
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"eta-{_cache_key(ds, options)}.npy"
        if cache_file.exists():
            eta = np.load(cache_file)
            if eta.shape == (len(ds), ds.num_classes):
                return eta
    if method == "sklearn":
        eta = _sklearn_eta(ds, folds, seed)
    else:
        eta = _torch_eta(ds, epochs, seed, batch_size, num_workers)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as fh:
            np.save(fh, eta)
    return eta

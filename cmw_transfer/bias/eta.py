"""``eta``: per-sample class probabilities from a classifier trained on the *clean* labels (PMD's input).

PMD turns eta into discrete labels through thresholds (top-1 vs top-2 class, ``rng.random() < q``), so any
floating-point difference between machines can flip a label. Biased labels are data and must be identical on
every machine, so each method is built to give the same bits everywhere:

* ``knn`` (default for in-memory data up to 20,000 samples, such as digits): leave-one-out class-wise nearest
  neighbours in exact integer arithmetic. Features are quantised to a 1/4096 grid; squared distances are then
  integers that float64 BLAS computes exactly whatever its kernel or thread count; class scores are rational
  functions of those integers built from correctly rounded operations only (``+ - * /``, summed in a fixed
  order). No sample is scored by itself. A fraction of a second on digits.
* ``pooled-knn`` (default for larger in-memory grey images: Fashion-MNIST, MNIST, KMNIST): the same estimator on
  reduced integer features, fast enough for 60,000 samples (O(N^2) distances, but float32 and on 196 values).
  Each image is box-summed over p x p pixels (the smallest p leaving at most 256 values; 28x28 -> 14x14) and
  rounded, in integer arithmetic, to 0..127. Then every partial sum of the float32 product ``[x_i, 1] .
  [-2 x_j, |x_j|^2]`` is an integer below 3 * 256 * 127**2 < 2**24, so float32 BLAS computes it exactly in any
  order, kernel or thread count; samples are sorted by class so each class is one contiguous column range whose
  3 smallest values ``torch.topk`` selects (a selection, no arithmetic). The result equals ``knn``'s distances on
  the same features bit for bit (tested) and goes through the same score. On digits (8x8: no pooling, 7-bit
  instead of 12-bit values) it changes 2 of 1347 digits-pmd labels; see README "Real data" for the comparison.
  Cached like ``torch`` (the key includes the features' content), since 60,000 samples take tens of seconds.
* ``torch`` (default otherwise, any dataset incl. image files): a small CNN trained for a few epochs and
  scored on its own training samples in eval mode, like PLC (which records eta during its last epoch). Its
  floats depend on the machine, so its result is quantised to a 2**-20 grid and cached as ``.npy`` under
  ``cache_dir`` (default ``$CMW_CACHE_DIR`` or ``~/.cache/cmw_transfer/eta``), keyed by the dataset's content
  and the options: copy that file to another machine to get the same labels there (``labels_digest`` in
  ``data --json`` / ``run.json`` tells whether two machines agree).
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
    from cmw_transfer.bias.labeled import Labeled

KNN_MAX_SAMPLES = 20000
POOLED_MAX_SAMPLES = 200_000  # O(N^2): about 3 min of 2 CPU cores at this size; larger sets get the CNN
METHODS = ("auto", "knn", "pooled-knn", "torch")
POOLED_VALUES = 256  # at most this many features per sample after pooling
POOLED_LEVELS = 127  # 3 * 256 * 127**2 < 2**24: every partial sum of the float32 product is an exact integer
POOLED_ROWS = 1024  # rows of the distance matrix per block (1024 x 60,000 float32 = 245 MB)
FEATURE_GRID = 4096  # features in [0, 1] -> integers 0..4096: exact squared distances for any D < 2**29
KNN_NEIGHBOURS = 3  # per class: the mean squared distance to the 3 nearest samples of that class
KNN_SHARPNESS = 2  # score = (nearest / class distance) ** 4 (two correctly rounded squarings): its Delta
# distribution on digits is close to an out-of-fold logistic regression's (median top-1 minus top-2: 0.95 vs 0.93)
TORCH_GRID = 2.0**20
ROW_BLOCK = 1024


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMW_CACHE_DIR") or Path.home() / ".cache" / "cmw_transfer") / "eta"


def _clean_labels(ds: Labeled) -> np.ndarray:
    return ds.clean_targets if ds.clean_targets is not None else ds.targets


def _cache_key(ds: Labeled, options: dict) -> str:
    h = hashlib.sha256(json.dumps({**options, "name": ds.name, "split": ds.split, "n": len(ds),
                                   "classes": ds.num_classes}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(_clean_labels(ds)).tobytes())
    h.update(np.ascontiguousarray(ds.rows).tobytes())
    return h.hexdigest()[:20]


def quantised_features(x: np.ndarray) -> np.ndarray:
    """Features in [0, 1] as float64 integers on a 1/4096 grid (exactly representable, exact products)."""
    return np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * FEATURE_GRID)


def class_distances(q: np.ndarray, labels: np.ndarray, num_classes: int, k: int = KNN_NEIGHBOURS) -> np.ndarray:
    """``[N, C]``: mean squared distance from each sample to its ``k`` nearest *other* samples of each class.

    Every distance is an integer below 2**53, so the BLAS product is exact in any summation order; a class
    with no other sample is ``inf``.
    """
    n = q.shape[0]
    norms = np.einsum("ij,ij->i", q, q)  # exact: integer sums below 2**53
    out = np.full((n, num_classes), np.inf)
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for start in range(0, n, ROW_BLOCK):
        rows = np.arange(start, min(start + ROW_BLOCK, n))
        d2 = norms[rows, None] + norms[None, :] - 2.0 * (q[rows] @ q.T)
        d2[np.arange(rows.size), rows] = np.inf  # leave one out
        for c, idx in enumerate(members):
            if idx.size == 0:
                continue
            kk = min(k, idx.size)
            nearest = np.partition(d2[:, idx], kk - 1, axis=1)[:, :kk]
            total = nearest[:, 0].copy()
            for j in range(1, kk):  # fixed order: same bits everywhere
                total += nearest[:, j]
            out[rows, c] = total / kk
    return out


def knn_eta(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class probabilities from :func:`class_distances`: ``((d_min + 1) / (d_c + 1)) ** 4``, normalised.

    Only correctly rounded IEEE operations in a fixed order, so the result is bit-identical on every machine.
    """
    return eta_from_distances(class_distances(quantised_features(features), np.asarray(labels), num_classes))


def pooled_features(data: np.ndarray) -> np.ndarray:
    """``[N, D <= 256]`` int64 in 0..127: p x p box sums of 8-bit pixels, rounded in integer arithmetic.

    ``data`` is an in-memory store: uint8 ``N x H x W x C`` or float ``N x C x H x W`` in [0, 1] (made 8-bit by
    one correctly rounded multiply). Edge pixels that do not fill a p x p box are dropped.
    """
    if data.dtype == np.uint8:
        x = data
    else:
        x = np.rint(np.clip(np.asarray(data, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
        x = x.transpose(0, 2, 3, 1)
    n, h, w, c = x.shape
    p = 1
    while (h // p) * (w // p) * c > POOLED_VALUES:
        p += 1
    hp, wp = h // p, w // p
    sums = x[:, :hp * p, :wp * p, :].reshape(n, hp, p, wp, p, c).sum(axis=(2, 4), dtype=np.int64)
    full = 255 * p * p
    return (sums.reshape(n, -1) * POOLED_LEVELS + full // 2) // full


def pooled_class_distances(q: np.ndarray, labels: np.ndarray, num_classes: int, k: int = KNN_NEIGHBOURS,
                           rows: int = POOLED_ROWS) -> np.ndarray:
    """:func:`class_distances` for integer features in 0..127 (at most 256 of them), exact in float32.

    Samples are sorted by class; a block of rows is one float32 product with the augmented columns
    ``[-2 x_j, |x_j|^2]`` (exact: module docstring), the sample itself is set to ``inf`` and each class's contiguous
    column range gives its ``k`` smallest values by ``torch.topk``; adding ``k |x_i|^2`` and dividing by ``k`` in
    float64 gives the same numbers as :func:`class_distances`.
    """
    import torch

    q = np.asarray(q, dtype=np.int64)
    n, d = q.shape
    if d > POOLED_VALUES or (q.size and (q.min() < 0 or q.max() > POOLED_LEVELS)):
        raise ValueError(f"pooled features must be at most {POOLED_VALUES} integers in 0..{POOLED_LEVELS}")
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    qs = q[order]
    norms = np.einsum("ij,ij->i", qs, qs)  # exact int64
    left = np.concatenate([qs, np.ones((n, 1), dtype=np.int64)], axis=1).astype(np.float32)
    right = np.ascontiguousarray(np.concatenate([-2 * qs, norms[:, None]], axis=1).T.astype(np.float32))
    out = np.full((n, num_classes), np.inf)
    buffer = np.empty((min(rows, n), n), dtype=np.float32)  # reused: no fresh pages (and page faults) per block
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = np.matmul(left[start:stop], right, out=buffer[:stop - start])  # exact integers: |x_j|^2 - 2 x_i.x_j
        own = np.arange(stop - start)
        block[own, start + own] = np.inf  # leave one out
        values = torch.from_numpy(block)
        for c in range(num_classes):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            kk = min(k, hi - lo)
            if kk == 0:
                continue
            nearest = torch.topk(values[:, lo:hi], kk, dim=1, largest=False).values.double().numpy()
            total = nearest[:, 0].copy()
            for j in range(1, kk):  # fixed order (exact anyway: integers)
                total += nearest[:, j]
            out[start:stop, c] = (total + kk * norms[start:stop].astype(np.float64)) / kk
    result = np.empty_like(out)
    result[order] = out
    return result


def eta_from_distances(d: np.ndarray) -> np.ndarray:
    """``((d_min + 1) / (d_c + 1)) ** 4``, normalised per row: correctly rounded operations in a fixed order."""
    nearest = np.min(d, axis=1, keepdims=True)  # exact: a min, not a sum
    score = np.where(np.isfinite(d), (nearest + 1.0) / (d + 1.0), 0.0)
    for _ in range(KNN_SHARPNESS):
        score = score * score
    total = score[:, 0].copy()
    for c in range(1, d.shape[1]):
        total += score[:, c]
    return score / total[:, None]


def _knn_eta(ds: Labeled, pooled: bool = False) -> np.ndarray:
    y = _clean_labels(ds)
    if np.unique(y).size < 2:
        eta = np.zeros((len(ds), ds.num_classes), dtype=np.float64)
        eta[np.arange(len(ds)), y] = 1.0
        return eta
    if pooled:
        q = pooled_features(ds.data[ds.rows])  # type: ignore[attr-defined]
        return eta_from_distances(pooled_class_distances(q, y, ds.num_classes))
    return knn_eta(ds.features(), y, ds.num_classes)


def _grey(ds: Labeled) -> bool:
    return getattr(ds, "input_shape", (0,))[0] == 1


def quantise_eta(eta: np.ndarray) -> np.ndarray:
    """Rows on a 2**-20 grid (exact binary fractions): a float that differs in its last bits lands on one value."""
    return np.rint(np.asarray(eta, dtype=np.float64) * TORCH_GRID) / TORCH_GRID


def _small_cnn(in_channels: int, num_classes: int):  # -> torch.nn.Module (torch imported lazily)
    from torch import nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(in_channels, 32), nn.MaxPool2d(2, ceil_mode=True), *block(32, 64),
                         nn.MaxPool2d(2, ceil_mode=True), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def _torch_eta(ds: Labeled, epochs: int, seed: int, batch_size: int, num_workers: int) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    clean = torch.as_tensor(_clean_labels(ds))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=ds.collate, generator=torch.Generator().manual_seed(seed))
    from cmw_transfer.progress import progress_bar

    model = None
    desc = f"eta for {ds.name}: training a small CNN on the clean labels (cached afterwards)"
    for _ in progress_bar(range(max(int(epochs), 1)), desc=desc, unit="epoch"):
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
                         collate_fn=ds.collate)
    with torch.no_grad():
        for x, _observed, idx in scoring:
            if idx.numel():
                eta[idx.numpy()] = torch.softmax(model(x), dim=1).double().numpy()
    return eta


def estimate_eta(
    ds: Labeled,
    *,
    method: str = "auto",
    epochs: int = 10,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
) -> np.ndarray:
    """``[len(ds), num_classes]`` class probabilities from a classifier trained on the clean labels.

    ``method``: ``"knn"``, ``"pooled-knn"``, ``"torch"`` or ``"auto"`` (knn for in-memory data with at most 20000
    samples, pooled-knn for larger in-memory grey images up to 200,000, torch otherwise). See the module docstring
    for why each is machine-stable and for caching.
    """
    if method == "auto":
        method = ("knn" if ds.in_memory and len(ds) <= KNN_MAX_SAMPLES else
                  "pooled-knn" if ds.in_memory and _grey(ds) and len(ds) <= POOLED_MAX_SAMPLES else "torch")
    if method not in METHODS:
        raise UserError(f"eta method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if method in ("knn", "pooled-knn") and not ds.in_memory:
        raise UserError(f"eta method {method!r} needs an in-memory dataset; {ds.name} is read from files, use 'torch'")
    if not len(ds):
        raise UserError(f"{ds.name}: cannot estimate eta on an empty dataset")
    options = {"method": method, **({"seed": seed, "epochs": epochs} if method == "torch" else {})}
    if method == "pooled-knn":  # the images enter the key: the result is a function of them
        options["features"] = hashlib.sha256(np.ascontiguousarray(ds.data[ds.rows]).tobytes()).hexdigest()[:20]
    if cache_dir is None and method in ("torch", "pooled-knn"):
        cache_dir = default_cache_dir()
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"eta-{_cache_key(ds, options)}.npy"
        if cache_file.exists():
            eta = np.load(cache_file, allow_pickle=False)
            if eta.shape == (len(ds), ds.num_classes):
                return eta
    if method in ("knn", "pooled-knn"):
        eta = _knn_eta(ds, pooled=method == "pooled-knn")
    else:
        eta = quantise_eta(_torch_eta(ds, epochs, seed, batch_size, num_workers))
    if cache_file is not None:
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as fh:
            np.save(fh, eta)
    return eta

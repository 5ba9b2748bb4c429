"""Open-set evaluation of the apply stages: the open set itself, class centroids and reachability rejection.

Open set: held-out classes (``open_classes``: renumbered away from training, their test samples unknown), an
``open_dataset`` whose every sample is unknown, or ImageNet-LT's ``open`` split when its list file exists. A
sample whose reachability ``s / min_i |v - c_i|`` falls below a threshold is rejected as unknown. ERM and OLTR
stage 1 use the class means of their training features as ``c``; OLTR stage 2 its memory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmw_transfer.errors import UserError
from cmw_transfer.metrics.openset import calibrated_threshold, open_set_report
from cmw_transfer.models.oltr import features_and_logits, reachability
from cmw_transfer.trainer.config import ApplyConfig, parse_open_classes
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.evaluation import autocast, device_batches
from cmw_transfer.trainer.engine.loaders import make_loader


def _relabel(ds: Any, remap: np.ndarray, known: list[int]) -> Any:
    view = copy.copy(ds)
    view.num_classes = len(known)
    view.targets = remap[ds.targets]
    view.clean_targets = None if ds.clean_targets is None else remap[ds.clean_targets]
    if ds.classes is not None:
        view.classes = [ds.classes[c] for c in known]
    return view


def as_unknown(ds: Any, num_known: int) -> Any:
    """Every sample of ``ds`` labelled ``num_known`` ("unknown"), whatever its own label."""
    view = copy.copy(ds)
    view.num_classes = num_known + 1
    view.targets = np.full(len(ds), num_known, dtype=np.int64)
    view.clean_targets = None
    view.classes = None
    return view


def hold_out_classes(train_ds: Any, eval_sets: list[tuple[str, Any]],
                     classes: Sequence[int]) -> tuple[Any, list[tuple[str, Any]], Any]:
    """Known classes renumbered 0..K-1 everywhere; the held-out classes' test samples become the open set.

    Training samples whose observed *or* true label is held out are dropped: an open class must stay unseen.
    """
    c = int(train_ds.num_classes)
    held = sorted(set(int(k) for k in classes))
    bad = [k for k in held if not 0 <= k < c]
    if bad:
        raise UserError(f"--open-classes {bad}: the training set has classes 0..{c - 1}")
    known = [k for k in range(c) if k not in held]
    if len(known) < 2:
        raise UserError(f"--open-classes leaves {len(known)} known class(es); a classifier needs at least 2")
    remap = np.full(c, -1, dtype=np.int64)
    remap[known] = np.arange(len(known))
    keep = np.isin(train_ds.targets, known)
    if train_ds.clean_targets is not None:
        keep &= np.isin(train_ds.clean_targets, known)
    train = _relabel(train_ds.subset(np.flatnonzero(keep)), remap, known)
    evals, open_ds = [], None
    for label, ds in eval_sets:
        evals.append((label, _relabel(ds.subset(np.flatnonzero(np.isin(ds.targets, known))), remap, known)))
        if label == "test":
            open_ds = as_unknown(ds.subset(np.flatnonzero(np.isin(ds.targets, held))), len(known))
    if open_ds is None or not len(open_ds):
        raise UserError(f"--open-classes {held}: the test split has no samples of those classes")
    return train, evals, open_ds


def _load_open_dataset(cfg: ApplyConfig, spec: str) -> Any:
    from cmw_transfer.dataset import create_dataset, resolve_source

    base, _ = resolve_source(spec)
    same = base == resolve_source(cfg.dataset)[0]
    transform = None
    if cfg.img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        transform = make_transform("val", cfg.img_size)
    try:
        return create_dataset(base, cfg.data_root if same else None, "open" if base == "imagenet-lt" else "test",
                              transform=transform, seed=cfg.seed, strict=cfg.strict)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(f"--open-dataset {spec}: {exc}") from None


def prepare_open_set(cfg: ApplyConfig, train_ds: Any,
                     eval_sets: list[tuple[str, Any]]) -> tuple[Any, list[tuple[str, Any]], Any | None]:
    """The open set of a run: held-out classes, ``--open-dataset`` (every sample unknown), or ImageNet-LT's
    ``open`` split when its list file exists. Returns (train, eval sets, open set labelled ``num_classes``)."""
    if cfg.open_classes:
        return hold_out_classes(train_ds, eval_sets, parse_open_classes(cfg.open_classes))
    spec = cfg.open_dataset
    if not spec:
        from cmw_transfer.dataset import resolve_source
        from cmw_transfer.dataset.formats.imagenet_lt import list_file

        if resolve_source(cfg.dataset)[0] != "imagenet-lt" or cfg.data_root is None:
            return train_ds, eval_sets, None
        try:
            list_file(Path(cfg.data_root).expanduser(), "open")
        except UserError:  # no ImageNet_LT_open.txt: closed-set evaluation only
            return train_ds, eval_sets, None
        spec = "imagenet-lt"
    return train_ds, eval_sets, as_unknown(_load_open_dataset(cfg, spec), int(train_ds.num_classes))


# -- centroids ----------------------------------------------------------------------------------------------------
def train_eval_view(ds: Any, cfg: ApplyConfig) -> Any:
    """The training samples without augmentation (centroids are class means of clean, deterministic features)."""
    view = copy.copy(ds)
    if cfg.img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        view.transform = make_transform("val", cfg.img_size)
    else:
        view.transform = None  # in-memory: the plain tensor; files: the default eval transform of the split
        view.split = "val"
    return view


def train_view_loader(train_ds: Any, cfg: ApplyConfig, ctx: DistributedContext) -> Any:
    """Sharded, unshuffled, unaugmented pass over the training set (centroids)."""
    return make_loader(train_eval_view(train_ds, cfg), cfg.batch_size, train=False, workers=cfg.workers,
                       seed=cfg.seed, distributed=ctx.enabled)


@torch.no_grad()
def class_centroids(features: Callable[[torch.Tensor], torch.Tensor], loader: Any, ctx: DistributedContext,
                    num_classes: int, amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of ``features(x)`` over ``loader``: ``([C, D] float32, counts [C])``.

    Exact under DDP: each rank sums its shard (float64) and the sums and counts are all-reduced. A class without
    samples gets the mean of all features (a harmless memory slot; reachability ignores such classes).
    """
    device = ctx.device
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for x, y in device_batches(loader, device):
        with autocast(device, amp_dtype):
            v = features(x)
        v = v.double()
        if sums is None:
            sums = torch.zeros(num_classes, v.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, y, v)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    dims = [d for d in ctx.all_gather_object(None if sums is None else sums.shape[1]) if d is not None]
    if not dims:
        raise UserError("no readable training image to compute class centroids from")
    if sums is None:  # this rank's shard was empty
        sums = torch.zeros(num_classes, dims[0], dtype=torch.float64, device=device)
    total = ctx.all_reduce_sum(sums.cpu())
    n = ctx.all_reduce_sum(counts.cpu())
    centroids = total / n.clamp_min(1.0)[:, None]
    if (n == 0).any() and n.sum() > 0:
        centroids[n == 0] = total.sum(0) / n.sum()
    return centroids.float(), n



@torch.no_grad()
def evaluate_open_set(model: nn.Module, known: Any, unknown: Any, centroids: torch.Tensor, counts: np.ndarray,
                      ctx: DistributedContext, cfg: ApplyConfig, amp_dtype: torch.dtype | None = None
                      ) -> dict[str, Any]:
    """The ``known`` loader's samples (the closed test split) and the ``unknown`` loader's (the open set, every
    one unknown), rejected below the reachability to ``centroids`` (per class; those of ``counts == 0`` unused).

    The threshold is ``open_threshold`` or, by default, the reachability that accepts ``open_accept`` of the known
    test samples. Every rank evaluates its shard; predictions and scores are gathered, so the numbers are exact
    under DDP.
    """
    device, num_classes = ctx.device, int(counts.size)
    model.eval()
    memory = centroids.to(device).float()[torch.as_tensor(counts > 0, device=device)]
    preds, labels, scores = [], [], []
    for loader, is_unknown in ((known, False), (unknown, True)):
        for x, y in device_batches(loader, device):
            with autocast(device, amp_dtype):
                v, logits = features_and_logits(model, x)
            preds.append(logits.float().argmax(1).cpu())
            scores.append(reachability(v.float(), memory, cfg.reachability_scale).cpu())
            labels.append(torch.full_like(y, num_classes).cpu() if is_unknown else y.cpu())
    local = [torch.cat(t).numpy() if t else np.zeros(0) for t in (preds, labels, scores)]
    gathered = ctx.all_gather_object(local)
    pred, label, score = (np.concatenate([g[i] for g in gathered]) for i in range(3))
    is_known = label != num_classes
    threshold = (cfg.open_threshold if cfg.open_threshold is not None
                 else calibrated_threshold(score[is_known], cfg.open_accept))
    return open_set_report(pred.astype(np.int64), label.astype(np.int64), score, num_classes, threshold)

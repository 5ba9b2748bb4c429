"""CurveNet's input: a probe's loss curves, class-normalised (Eq. 7-8), read row by row from the memory map.

``features(idx)`` drops the first ``skip`` epochs (early losses are "irregular", S = 5 in the paper) and subtracts
the mean curve of the sample's *observed* class, epoch by epoch:

    mu_{k,t} = mean_{j: y_j = k} l_{j,t}          (Eq. 7)
    lbar_{i,t} = l_{i,t} - mu_{y_i,t}              (Eq. 8)

The abstract also divides by the class's standard deviation; Eq. 8 and the authors' code do not, and neither do
we by default (``divide_std=True`` adds it, for the ablation). The class means are one pass over the file in
chunks, so nothing of size N x T is ever in memory; a batch's features are its rows, gathered on demand.

``length`` resamples the kept part of the curve linearly to a fixed number of points over relative time: what
makes a CurveNet independent of the probe's length (the transferable mode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn

from cmw_transfer.artifact.curvenet import CurveNet
from cmw_transfer.artifact.scales import fit_families
from cmw_transfer.defaults import PROBE_NAME, SCHEDULE_KEYS
from cmw_transfer.errors import UserError
from cmw_transfer.untrusted import loads
from cmw_transfer.weighting.base import WeightedLoss

CHUNK_ROWS = 65536


@dataclass
class ProbeCurves:
    """A finished probe: the ``N x T`` float16 memory map, the observed labels it was normalised by, its record."""

    path: Path
    losses: np.ndarray
    labels: np.ndarray
    record: dict[str, Any]

    @property
    def epochs(self) -> int:
        return int(self.losses.shape[1])

    @property
    def schedule(self) -> dict[str, Any]:
        return dict(self.record.get("schedule", {}))


def load_curves(directory: str | Path, hint: str = "cmw-transfer probe --dataset SPEC --out DIR") -> ProbeCurves:
    """Open a probe directory read-only; a missing, unfinished or damaged probe is one ``UserError``."""
    path = Path(directory)
    record_path = path / PROBE_NAME
    if not record_path.is_file():
        raise UserError(f"--curves {path}: no {PROBE_NAME} there, so no loss curves; record them first with: {hint}")
    try:
        record = loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--curves {path}: {PROBE_NAME} is unreadable ({exc}); run the probe again") from None
    if not isinstance(record, dict):
        raise UserError(f"--curves {path}: {PROBE_NAME} is not a JSON object; run the probe again")
    if not record.get("complete"):
        raise UserError(f"--curves {path}: the probe has not finished (continue it with cmw-transfer probe ... "
                        f"--out {path} --resume)")
    try:
        losses = open_memmap(path / record.get("losses", "losses.npy"), mode="r")
        labels = np.load(path / record.get("labels", "labels.npy"), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"--curves {path}: cannot read the curves ({exc}); run the probe again") from None
    if losses.ndim != 2 or labels.shape != (losses.shape[0],):
        raise UserError(f"--curves {path}: losses {losses.shape} and labels {labels.shape} do not match; run the "
                        "probe again")
    return ProbeCurves(path, losses, labels.astype(np.int64), record)


def class_curve_stats(losses: np.ndarray, labels: np.ndarray, num_classes: int, *, chunk: int = CHUNK_ROWS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per (observed) class and epoch: mean and standard deviation, ``[K, T]`` float64, in one chunked pass."""
    t = losses.shape[1]
    sums, squares = np.zeros((num_classes, t)), np.zeros((num_classes, t))
    for start in range(0, losses.shape[0], chunk):
        block = np.asarray(losses[start:start + chunk], dtype=np.float64)
        y = labels[start:start + chunk]
        np.add.at(sums, y, block)
        np.add.at(squares, y, block * block)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)[:, None]
    mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    var = np.divide(squares, counts, out=np.zeros_like(sums), where=counts > 0) - mean ** 2
    return mean, np.sqrt(np.clip(var, 0.0, None))


def resample(curves: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation of each row onto ``length`` points spread evenly over the same (relative) time."""
    t = curves.shape[1]
    if t == length:
        return curves
    pos = np.linspace(0.0, t - 1, length)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, t - 1)
    frac = (pos - lo).astype(curves.dtype)
    return curves[:, lo] * (1 - frac) + curves[:, hi] * frac


class CurveFeatures:
    """``features(idx)`` -> ``[B, D]`` float32: rows ``idx`` of the probe, S epochs dropped, class mean removed."""

    def __init__(self, curves: ProbeCurves, num_classes: int, *, skip: int, length: int | None = None,
                 divide_std: bool = False) -> None:
        kept = curves.epochs - skip
        if skip < 0 or kept < 2:
            raise UserError(f"--curve-skip {skip}: the probe has {curves.epochs} epochs, so at least 2 must remain "
                            "after the skipped ones")
        self.curves, self.skip, self.length, self.divide_std = curves, int(skip), length, divide_std
        mean, std = class_curve_stats(curves.losses, curves.labels, num_classes)
        self.mean = mean[:, skip:].astype(np.float32)
        self.std = np.maximum(std[:, skip:], 1e-6).astype(np.float32)
        self.dim = int(length) if length is not None else kept

    def __len__(self) -> int:
        return int(self.curves.losses.shape[0])

    def __call__(self, idx: np.ndarray | torch.Tensor) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        order = np.argsort(idx, kind="stable")
        rows = np.empty((idx.size, self.curves.epochs), dtype=np.float32)
        rows[order] = self.curves.losses[idx[order]]  # ascending rows: sequential reads of the map
        y = self.curves.labels[idx]
        out = rows[:, self.skip:] - self.mean[y]
        if self.divide_std:
            out = out / self.std[y]
        return resample(out, self.length) if self.length is not None else out

    def chunks(self, chunk: int = CHUNK_ROWS):
        """``(idx, features)`` over every sample, in chunks (to precompute weights without an N x D array)."""
        n = len(self)
        for start in range(0, n, chunk):
            idx = np.arange(start, min(n, start + chunk))
            yield idx, self(idx)


def check_labels(curves: ProbeCurves, targets: np.ndarray, command: str) -> None:
    """The curves must index this very training set: same samples, same observed labels."""
    if curves.labels.shape != targets.shape or not np.array_equal(curves.labels, targets):
        what = (f"{curves.labels.size} samples" if curves.labels.shape != targets.shape
                else f"{int((curves.labels != targets).sum())} labels differ")
        raise UserError(f"--curves {curves.path} were probed on another training set than this run's ({what}; "
                        f"{targets.size} samples here): probe this data and bias with: {command}")


class CurveWeighting(WeightedLoss):
    """A frozen CurveNet as an apply-stage criterion: every sample's weight precomputed from its curve.

    The curve is a fixed attribute of the sample, so the weight is too: one table of N weights, looked up by
    sample id (the ``idx`` the apply step passes with every batch).
    """

    def __init__(self, net: nn.Module, features: CurveFeatures, key_of_sample: np.ndarray,
                 normalization: str = "batch") -> None:
        super().__init__()
        self.normalization = normalization
        table = np.empty(len(features), dtype=np.float32)
        net = net.eval()
        with torch.no_grad():
            for idx, feats in features.chunks():
                table[idx] = net(torch.as_tensor(feats), torch.as_tensor(key_of_sample[idx])).numpy()
        self.register_buffer("table", torch.as_tensor(table))

    @torch.no_grad()
    def weights(self, losses: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            raise ValueError("CurveWeighting needs the batch's sample ids")
        return self.table[idx.to(self.table.device)].to(losses.dtype)


# -- the frozen net in the apply stage ------------------------------------------------------------------------------
def curve_criterion(net: CurveNet, curves_dir: str | None, train_ds: Any, normalization: str, probe_hint: str
                    ) -> CurveWeighting:
    """A transferable CurveNet and the target's probe -> the apply stage's criterion (weights by sample id)."""
    if net.mode != "transferable":
        raise UserError("this CurveNet was meta-trained in faithful mode: its class embedding is tied to the source's "
                        "labels and its input to the source probe's length, so it does not transfer; meta-train "
                        "with --curvenet-mode transferable")
    if not curves_dir:
        raise UserError(f"a CurveNet weighs samples by their loss curves: add --curves DIR, recorded on this data "
                        f"with the net's probe schedule: {probe_hint}")
    curves = load_curves(curves_dir, hint=probe_hint)
    check_labels(curves, train_ds.targets, probe_hint)
    differ = [k for k in SCHEDULE_KEYS if curves.schedule.get(k) != net.probe.get(k)]
    if differ:
        got = ", ".join(f"{k}={curves.schedule.get(k)} (net: {net.probe.get(k)})" for k in differ)
        raise UserError(f"--curves {curves.path} were probed with another schedule than the net's: {got}; "
                        f"probe again with: {probe_hint}")
    source_epochs = int(net.probe["epochs"])
    skip = round(net.curve_skip * curves.epochs / source_epochs)  # the same fraction of the run
    features = CurveFeatures(curves, train_ds.num_classes, skip=skip, length=net.curve_length)
    _, families = fit_families(train_ds.class_counts(), net.num_keys)
    return CurveWeighting(net, features, np.asarray(families)[train_ds.targets], normalization)


def probe_hint_for(cfg: Any, net: CurveNet) -> str:
    """The probe command for an apply run's data with the net's schedule."""
    parts = [f"cmw-transfer probe --dataset {cfg.dataset}", f"--noise {cfg.noise}" if cfg.noise else "",
             f"--imbalance {cfg.imbalance:g}" if cfg.imbalance else "", f"--seed {cfg.seed}"]
    parts += [f"--{k.replace('_', '-')} {net.probe[k]}" for k in SCHEDULE_KEYS if k in net.probe]
    return " ".join(p for p in parts if p) + " --out DIR"

"""Meta sets: the small trusted set whose loss the weighting net is meta-trained to reduce.

``clean:N``       N ground-truth samples per class held out *before* the bias is applied (needs known truth).
``lowest-loss:N`` the N lowest-loss samples per observed class under the EMA model, rebuilt every epoch (the paper).
``gmm``           samples whose clean posterior under a two-component GMM of normalised losses exceeds 0.5 (FaMUS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from cmw_transfer.errors import UserError


@dataclass(frozen=True)
class MetaSetSpec:
    kind: str  # "clean" | "lowest-loss" | "gmm"
    per_class: int = 0

    @property
    def rebuilt_each_epoch(self) -> bool:
        return self.kind != "clean"


def parse_meta_set(text: str) -> MetaSetSpec:
    kind, sep, count = str(text).partition(":")
    if kind == "gmm" and not sep:
        return MetaSetSpec("gmm")
    if kind in ("clean", "lowest-loss") and re.fullmatch("[0-9]{1,9}", count) and int(count) > 0:  # ASCII digits
        return MetaSetSpec(kind, int(count))
    raise UserError(f"--meta-set must be clean:N, lowest-loss:N or gmm (N > 0, digits 0-9), got {text!r}")


def check_class_sizes(counts: np.ndarray, per_class: int, what: str) -> None:
    """Refuse a meta set that would take a class's every sample; classes without samples have no part in it."""
    small = np.flatnonzero(counts <= per_class) if what == "clean" else np.flatnonzero(counts < per_class)
    small = small[counts[small] > 0]
    if small.size:
        need = "more than" if what == "clean" else "at least"
        raise UserError(f"--meta-set {what}:{per_class} needs {need} {per_class} samples in every class, but "
                        f"class(es) {small[:10].tolist()} have {counts[small[:10]].tolist()}; lower N")


def lowest_loss_indices(losses: np.ndarray, targets: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """The ``per_class`` lowest-loss samples of each observed class (sorted indices)."""
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        order = np.argsort(losses[members], kind="stable")[:per_class]
        picked.append(members[order])
    return np.sort(np.concatenate(picked))


def gmm_clean_indices(losses: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices whose posterior of the low-mean component is > 0.5 (losses min-max normalised first)."""
    x = (losses - losses.min()) / max(float(losses.max() - losses.min()), 1e-12)
    gmm = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed).fit(x.reshape(-1, 1))
    clean = int(np.argmin(gmm.means_.reshape(-1)))
    prob = gmm.predict_proba(x.reshape(-1, 1))[:, clean]
    return np.flatnonzero(prob > 0.5)


@torch.no_grad()
def per_sample_losses(model: torch.nn.Module, loader, device: torch.device, size: int) -> np.ndarray:
    """CE of every training sample under ``model`` in eval mode (the authors use the EMA model)."""
    model.eval()
    out = np.full(size, np.inf, dtype=np.float64)
    for batch in loader:
        if batch is None:
            continue
        x, y, idx = batch
        logits = model(x.to(device))
        loss = torch.nn.functional.cross_entropy(logits.float(), y.to(device), reduction="none")
        out[idx.numpy()] = loss.cpu().numpy()
    return out

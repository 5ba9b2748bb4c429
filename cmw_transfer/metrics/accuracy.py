"""Classification metrics: top-k, many/medium/few-shot splits, clean-vs-noisy separation of weights."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

MANY_SHOT = 100  # > 100 training images
FEW_SHOT = 20  # < 20 training images


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample 0/1 correctness for each k (k clipped to the number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(targets[:, None])
    return {k: hits[:, : min(k, kmax)].any(dim=1) for k in ks}


def shot_masks(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Which classes are many (>100), medium (20-100) and few (1-19) shot, by training-set class size.

    A class without training samples is in no split: "few" means seen a few times, not never seen.
    """
    counts = np.asarray(train_counts)
    return {"many": counts > MANY_SHOT, "medium": (counts >= FEW_SHOT) & (counts <= MANY_SHOT),
            "few": (counts < FEW_SHOT) & (counts > 0)}


def shot_split_accuracy(correct: np.ndarray, targets: np.ndarray, train_counts: np.ndarray) -> dict[str, float]:
    """Accuracy on many (>100), medium (20-100) and few (1-19) shot classes (NaN: no sample of that split)."""
    splits = {name: mask[targets] for name, mask in shot_masks(train_counts).items()}
    return {name: float(correct[mask].mean()) if mask.any() else float("nan") for name, mask in splits.items()}


def clean_noisy_auc(weights: np.ndarray, is_clean: np.ndarray) -> float:
    """AUC of weights as a clean-vs-noisy score: 0.5 is chance, 1.0 means every clean sample outweighs every noisy."""
    is_clean = np.asarray(is_clean, dtype=bool)
    if is_clean.all() or not is_clean.any():
        return float("nan")
    return float(roc_auc_score(is_clean, weights))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device | str,
             train_counts: np.ndarray | None = None) -> dict[str, float]:
    """top-1 / top-5 (in %) over a loader of (x, y, index); shot splits when training class counts are given."""
    model.eval()
    correct1, correct5, labels = [], [], []
    for batch in loader:
        if batch is None:
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        hits = topk_correct(model(x), y)
        correct1.append(hits[1].cpu())
        correct5.append(hits[5].cpu())
        labels.append(y.cpu())
    if not labels:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    c1 = torch.cat(correct1).numpy()
    out = {"top1": 100.0 * float(c1.mean()), "top5": 100.0 * float(torch.cat(correct5).float().mean()),
           "n": int(c1.size)}
    if train_counts is not None:
        y_all = torch.cat(labels).numpy()
        out.update({f"{k}_top1": 100.0 * v for k, v in shot_split_accuracy(c1, y_all, train_counts).items()})
    return out

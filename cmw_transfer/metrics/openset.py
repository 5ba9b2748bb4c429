"""Open-set metrics: "unknown" is one extra class, label ``num_known`` (the ImageNet-LT ``open`` convention).

``open_f_measure`` is the F-measure of the OLTR paper exactly as its official code computes it (zhmiao/OLTR,
``utils.F_measure``): a known sample is a true positive when it is classified correctly and a false positive
when it is not (a wrong known class *or* rejected as unknown); an unknown sample is a false negative when it is
accepted as any known class (a rejected unknown counts nowhere). It is one pooled (micro-style) number that
rewards closed-set accuracy and rejecting unknowns at the same time. ``open_macro_f1`` is the other common
reading: per-class F1 over the known classes present plus "unknown", averaged without weights.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


def open_f_measure(pred: np.ndarray, label: np.ndarray, unknown: int) -> float:
    """OLTR's open-set F-measure; ``pred == unknown`` means rejected, ``label == unknown`` an open-set sample."""
    pred, label = np.asarray(pred), np.asarray(label)
    known = label != unknown
    tp = float(np.sum(known & (pred == label)))
    fp = float(np.sum(known & (pred != label)))
    fn = float(np.sum(~known & (pred != unknown)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2.0 * precision * recall / (precision + recall + 1e-12)


def open_macro_f1(pred: np.ndarray, label: np.ndarray, unknown: int) -> float:
    """Macro F1 over the classes present in ``label`` (known ones and "unknown", class ``unknown``): scikit-learn's
    ``f1_score`` restricted to those labels, a class never predicted scoring 0; NaN without samples."""
    pred, label = np.asarray(pred), np.asarray(label)
    present = np.unique(label)
    if not present.size:
        return float("nan")
    return float(f1_score(label, pred, labels=present, average="macro", zero_division=0.0))


def open_set_report(logits_pred: np.ndarray, label: np.ndarray, score: np.ndarray, unknown: int,
                    threshold: float) -> dict[str, float]:
    """Reject (predict ``unknown``) where ``score < threshold``; F-measures, rates and the threshold-free AUROC.

    ``score`` is higher for "more known" (the reachability); ``logits_pred`` the closed-set argmax.
    """
    label = np.asarray(label)
    score = np.asarray(score, dtype=np.float64)
    pred = np.where(score < threshold, unknown, np.asarray(logits_pred))
    known = label != unknown
    out = {
        "f1": open_f_measure(pred, label, unknown),
        "macro_f1": open_macro_f1(pred, label, unknown),
        "threshold": float(threshold),
        "known_accept": float(np.mean(pred[known] != unknown)) if known.any() else float("nan"),
        "unknown_reject": float(np.mean(pred[~known] == unknown)) if (~known).any() else float("nan"),
        "known_top1": 100.0 * float(np.mean(pred[known] == label[known])) if known.any() else float("nan"),
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
    }
    both = known.any() and (~known).any()
    out["auroc"] = float(roc_auc_score(known, score)) if both else float("nan")
    return out


def calibrated_threshold(known_scores: np.ndarray, accept: float) -> float:
    """The highest threshold that still accepts at least a fraction ``accept`` of the known samples (reject below)."""
    scores = np.sort(np.asarray(known_scores, dtype=np.float64))
    if not scores.size:
        return 0.0
    k = min(int(np.floor((1.0 - accept) * scores.size + 1e-9)), scores.size - 1)
    return float(scores[k])

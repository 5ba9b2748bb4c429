"""Meta-test re-clustering and the loss-range check: how a frozen net meets a target's classes and losses."""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import numpy as np

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import DegenerateScalesWarning, fit_families
from cmw_transfer.errors import UserError
from cmw_transfer.weighting.guards import long_tail_advice

RANGE_TOLERANCE = 0.01  # warn when more than 1% of the target's losses fall outside the artifact's range


def target_families(net: CMWNet, class_counts: np.ndarray, requested: int | None = None) -> dict[str, Any]:
    """Meta-test re-clustering: target class counts -> K centers -> family of each class -> head of that rank.

    Classes without samples join no family (see :func:`fit_families`); ``classes_per_head`` counts the others.
    """
    k = net.num_heads
    if requested is not None and requested != k:
        raise UserError(f"the weights have K={k} heads but --families {requested} was requested; drop --families "
                        f"or use a net meta-trained with {requested} families")
    counts = np.asarray(class_counts, dtype=np.int64)
    present = int((counts > 0).sum())
    if present < 2:
        raise UserError(f"the training set has {present} class(es) with samples ({counts.size} declared): a "
                        "classifier needs at least 2; check --dataset / --noise / --imbalance")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DegenerateScalesWarning)
        centers, family = fit_families(counts, k)
    notes = [str(w.message) for w in caught if issubclass(w.category, DegenerateScalesWarning)]
    for w in caught:  # hand the warnings on (the CLI prints them as ``warning: ...``)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    regime = long_tail_advice(counts, net.centers, net.num_heads)
    if regime is not None:
        warnings.warn(regime, stacklevel=2)
    info = {
        "num_classes": int(counts.size),
        "num_heads": k,
        "class_counts": counts.tolist(),
        "centers": [float(c) for c in centers],
        "family_of_class": [int(f) for f in family],
        "head_of_class": [int(f) for f in family],  # head i = i-th smallest center, by construction
        "classes_per_head": np.bincount(family[counts > 0], minlength=k).astype(int).tolist(),
        "empty_classes": np.flatnonzero(counts == 0).tolist(),  # no sample: fitted on none, smallest head used
        "source_centers": net.centers,
        "degenerate_rule": notes[0] if notes else None,
        "regime_warning": regime,
    }
    info["digest"] = hashlib.sha256(json.dumps(info["family_of_class"]).encode()).hexdigest()[:16]
    return info


def loss_range_report(losses: np.ndarray, loss_range: dict[str, float] | None) -> dict[str, Any]:
    """Where the target's per-sample losses sit relative to the range recorded in the artifact."""
    if losses.size == 0:
        return {}
    q = np.quantile(losses, [0.01, 0.5, 0.99])
    report: dict[str, Any] = {"loss_p1": float(q[0]), "loss_p50": float(q[1]), "loss_p99": float(q[2]),
                              "loss_max": float(losses.max())}
    if loss_range:
        low = loss_range.get("min", loss_range.get("p1"))
        high = loss_range.get("max", loss_range.get("p99"))
        if low is not None and high is not None:
            report["frac_outside_range"] = float(np.mean((losses < low) | (losses > high)))
            report["source_range"] = [float(low), float(high)]
    return report



"""Meta-test re-clustering: how a frozen net meets a target's classes (its class-size families)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import DegenerateScalesWarning, fit_families
from cmw_transfer.errors import UserError
from cmw_transfer.weighting.guards import long_tail_advice


def refit(net: CMWNet, class_counts: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Meta-test re-clustering, the one every use of a frozen net shares: ``(centers, family of each class, the
    long-tail advice or None)`` for the target's class counts (head ``i`` = the ``i``-th smallest center)."""
    centers, family = fit_families(class_counts, net.num_heads)
    counts = np.asarray(class_counts).reshape(-1)
    return centers, family, long_tail_advice(counts.tolist(), net.centers, net.num_heads)


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
        centers, family, regime = refit(net, counts)
    notes = [str(w.message) for w in caught if issubclass(w.category, DegenerateScalesWarning)]
    for w in caught:  # hand the warnings on (the CLI prints them as ``warning: ...``)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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

"""Class-size families: k-means on per-class sample counts, heads ordered by size.

Head ``i`` of a CMW-Net always means "the i-th smallest class-size center". That convention is what makes a
net transferable: on a new dataset the centers are re-fitted on its own class counts and each class takes the
head of the same rank, whatever label numbers k-means happened to produce.

Degenerate targets (fewer distinct class sizes ``d`` than heads ``K``, e.g. a balanced dataset) follow one
documented rule instead of crashing: every distinct size becomes its own family, and the ``d`` families take
the heads whose ranks are spread evenly over ``0..K-1`` (``d = 1`` takes the middle head ``(K-1)//2``, i.e.
"medium" for K=3; ``d = 2`` takes the smallest and the largest head). The unused heads receive placeholder
centers strictly between (or beyond) their neighbours, so the centers stay strictly ascending and no class is
ever nearest to a placeholder. A :class:`DegenerateScalesWarning` says so.

Families must exist in the data, not in the noise of the counts: k-means always returns K clusters, also for a
balanced dataset whose counts differ by a few percent (121..149 per class), and a class-aware net would then treat
classes of the same true size differently. :func:`fit_families` therefore merges adjacent k-means clusters whose
centers differ by less than ``MIN_RELATIVE_GAP`` (20%: sampling noise in the counts of a balanced set of a
realistic size stays well inside it, while the paper's CIFAR-10 PMD families are 28% and 32% apart), from the
closest pair up, and the remaining ``d < K`` families take spread head ranks by the rule above (a balanced set:
the middle head). Merging is pairwise, so one class that sampling or label noise pushed just past the gap
would still stand alone (a noisy balanced digits split: 114..142 per class and one class at 161); a dataset whose
counts all lie within ``BALANCED_SPREAD`` (1.5x, largest / smallest) is therefore one family outright. A
genuine size structure spans more (the CIFAR-10 PMD families above span 1.7x; an imbalance factor of 2 already
spans 2x). Meta-training and meta-test use the same function, so source and target families are built alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans

KMEANS_SEED = 0
KMEANS_INITS = 10
MIN_RELATIVE_GAP = 0.2
BALANCED_SPREAD = 1.5


class DegenerateScalesWarning(UserWarning):
    """Fewer distinct class sizes than families: the documented fallback rule was applied."""


def _as_counts(class_counts: Sequence[float] | np.ndarray) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if counts.size == 0:
        raise ValueError("class_counts is empty: need at least one class")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("class_counts must be finite and non-negative")
    return counts


def spread_head_ranks(num_families: int, num_heads: int) -> np.ndarray:
    """Head index for each of ``num_families`` ascending families when there are fewer families than heads."""
    if num_families == 1:
        return np.array([(num_heads - 1) // 2])
    return np.round(np.linspace(0, num_heads - 1, num_families)).astype(int)


def _fill_placeholders(used_heads: np.ndarray, used_centers: np.ndarray, num_heads: int) -> np.ndarray:
    centers = np.full(num_heads, np.nan)
    centers[used_heads] = used_centers
    for head in range(num_heads):
        if not np.isnan(centers[head]):
            continue
        below = [h for h in used_heads if h < head]
        above = [h for h in used_heads if h > head]
        if below and above:  # interpolate between the nearest used neighbours
            lo, hi = max(below), min(above)
            frac = (head - lo) / (hi - lo)
            centers[head] = centers[lo] + frac * (centers[hi] - centers[lo])
        elif above:  # below the smallest family: halve per missing rank
            hi = min(above)
            centers[head] = centers[hi] * 0.5 ** (hi - head) if centers[hi] > 0 else -(hi - head)
        else:  # above the largest family: double per missing rank
            lo = max(below)
            centers[head] = centers[lo] * 2.0 ** (head - lo) if centers[lo] > 0 else head - lo
    return centers


def fit_scale_centers(
    class_counts: Sequence[float] | np.ndarray, k: int = 3, *, seed: int = KMEANS_SEED
) -> np.ndarray:
    """K-means (scikit-learn) on per-class counts; returns ``k`` strictly ascending centers.

    Deterministic: a fixed seed and several initialisations, so the same counts always give the same centers,
    independent of class order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    counts = _as_counts(class_counts)
    distinct = np.unique(counts)
    if distinct.size < k:
        warnings.warn(
            f"{distinct.size} distinct class size(s) for {k} families: each size is its own family, placed on "
            f"heads {spread_head_ranks(distinct.size, k).tolist()} (see cmw_transfer.artifact.scales)",
            DegenerateScalesWarning,
            stacklevel=2,
        )
        return _fill_placeholders(spread_head_ranks(distinct.size, k), distinct, k)
    km = KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=seed).fit(counts.reshape(-1, 1))
    centers = np.sort(km.cluster_centers_.reshape(-1))
    if np.any(np.diff(centers) <= 0):  # k-means collapsed two clusters onto one value
        raise RuntimeError(f"k-means returned coincident centers {centers.tolist()}")
    return centers


def assign_families(class_sizes: Sequence[float] | np.ndarray, centers: Sequence[float] | np.ndarray) -> np.ndarray:
    """Family (= head index) of each class: the nearest center; ties go to the smaller center."""
    sizes = _as_counts(class_sizes)
    centers = np.asarray(centers, dtype=np.float64).reshape(-1)
    if centers.size == 0 or np.any(np.diff(centers) <= 0):
        raise ValueError(f"centers must be non-empty and strictly ascending, got {centers.tolist()}")
    return np.abs(sizes[:, None] - centers[None, :]).argmin(axis=1).astype(np.int64)


def merge_close_families(
    class_counts: Sequence[float] | np.ndarray, family: np.ndarray, min_gap: float = MIN_RELATIVE_GAP
) -> np.ndarray:
    """Relabel ``family`` (ascending ids) after merging adjacent families whose mean counts are within ``min_gap``.

    Closest pair (by ratio of means) first; returns ascending family ids ``0..d-1``.
    """
    counts = _as_counts(class_counts)
    groups = [np.flatnonzero(family == f) for f in np.unique(family)]
    groups.sort(key=lambda g: counts[g].mean())
    while len(groups) > 1:
        means = np.array([counts[g].mean() for g in groups])
        ratios = means[1:] / np.maximum(means[:-1], 1e-12)
        i = int(np.argmin(ratios))
        if ratios[i] >= 1.0 + min_gap:
            break
        groups[i:i + 2] = [np.concatenate(groups[i:i + 2])]
    out = np.empty(counts.size, dtype=np.int64)
    for f, g in enumerate(groups):
        out[g] = f
    return out


def fit_families(
    class_counts: Sequence[float] | np.ndarray, k: int = 3, *, min_gap: float = MIN_RELATIVE_GAP
) -> tuple[np.ndarray, np.ndarray]:
    """``(centers, family_of_class)`` for a dataset's class counts: the meta-test re-clustering in one call.

    k-means, then adjacent families closer than ``min_gap`` (relative) merged (module docstring). When fewer
    than ``k`` families remain they take spread head ranks, with a :class:`DegenerateScalesWarning`; the
    returned family of a class is then its head.

    Classes with no sample (a count of 0) have no size: the families are fitted on the other classes only, and
    an empty class is given the head of the smallest family present, so it adds no head the data does not use
    (it never occurs in training; the entry only keeps the class -> head map total).
    """
    counts = _as_counts(class_counts)
    present = counts > 0
    if not present.all():
        if not present.any():
            raise ValueError("every class has a count of 0: no class size to fit families on")
        centers, present_family = fit_families(counts[present], k, min_gap=min_gap)
        family = np.full(counts.size, int(present_family.min()), dtype=np.int64)
        family[present] = present_family
        return centers, family
    with warnings.catch_warnings(record=True) as caught:  # held back: the merge below may replace the rule
        warnings.simplefilter("always", DegenerateScalesWarning)
        centers = fit_scale_centers(class_counts, k)
    family = assign_families(class_counts, centers)
    merged = family
    if k > 1:
        if counts.max() < BALANCED_SPREAD * counts.min():  # sizes that close differ by noise, not by kind
            merged = np.zeros(counts.size, dtype=np.int64)
        else:
            merged = merge_close_families(counts, family, min_gap)
    d = int(merged.max()) + 1
    replaced = d != np.unique(family).size  # the families are the merged ones: one note, describing those
    for w in caught:
        if not (replaced and issubclass(w.category, DegenerateScalesWarning)):
            warnings.warn(w.message, w.category, stacklevel=2)
    if not replaced:
        return centers, family
    heads = spread_head_ranks(d, k)
    means = np.array([counts[merged == f].mean() for f in range(d)])
    warnings.warn(
        f"class sizes form {d} family(ies) for {k} heads (k-means clusters closer than {min_gap:.0%} merged, "
        f"counts within {BALANCED_SPREAD:g}x one family): "
        f"classes use heads {heads.tolist()} (see cmw_transfer.artifact.scales)",
        DegenerateScalesWarning,
        stacklevel=2,
    )
    return _fill_placeholders(heads, means, k), heads[merged].astype(np.int64)

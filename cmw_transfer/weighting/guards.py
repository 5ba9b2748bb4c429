"""What keeps a frozen weighting net from wrecking a target run: warm-up, class floor, starvation, loss range.

A net meta-trained on one source is applied to a target it never saw. Three things can go wrong, and each has a
guard here, shared by the CLI trainers and the plug-in ``CMWLoss``:

* **Too early.** A from-scratch model starts with every loss near ``ln C``, where a net trained on a half-fitted
  source gives weights near 0: training freezes. :class:`WarmupGate` keeps plain CE until the net would give
  the target's samples a mean weight of at least ``READY_FRACTION`` of what it gives a typical source sample
  (its weight at the source's median loss), at the latest until ``AUTO_CAP`` of the run; never in epoch 1.
* **A class switched off.** A head that down-weights everything (a wrong family, a regime the net never saw)
  would starve whole classes. :func:`lift_class_floor` raises every class's mean weight in a batch to at least
  ``floor`` times the batch mean by an increasing affine map of its weights (order inside the class kept);
  :class:`ClassWeightMonitor` reports classes that stay far below the others.
* **Another regime.** A net meta-trained on a near-balanced source takes high losses for noise; under a strong
  long tail the high losses are largely clean tail samples, and no frozen net re-balances classes.
  :func:`long_tail_advice` names the fixed baseline to compare with when the target's imbalance factor is at
  least ``STRONG_TAIL`` (``STRONG_TAIL_ONE_CURVE`` for a K=1 net) and well above the source's.
* **Out of range.** :class:`LossRangeMonitor` counts the losses the net sees below and above the range it was
  trained on, only in epochs where it is applied, summed over DDP ranks; a net without a recorded range is
  "unchecked".

All per-step work is on-device tensor arithmetic (bincount, comparisons): no host synchronisation per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

READY_FRACTION = 0.5
AUTO_CAP = 0.25
DEFAULT_CLASS_FLOOR = 0.5
STARVED_FRACTION = 0.25
RANGE_TOLERANCE = 0.01
# digits matrix (README): the class-aware net matched ERM on a clean IF-10 tail and lost to class-balanced at IF 50;
# a one-curve (K=1, MW-Net) net already lost 4.4 points to ERM at IF 10
STRONG_TAIL = 20.0
STRONG_TAIL_ONE_CURVE = 10.0
TRUST_SIZE_CORR = 0.8  # trust_verdict: class size vs the net's class weight from which a tail is deepened
TRUST_MIN_SPREAD = 2.0  # ... on a target whose largest class has at least this many times the smallest's samples


def long_tail_advice(class_counts: Sequence[float], source_centers: Sequence[float] | None = None,
                     num_heads: int = 3) -> str | None:
    """A warning when the target is a far stronger long tail than the net's source, else None.

    The imbalance factor is largest / smallest count over the classes with samples; the source's is estimated
    from its class-size centers (largest / smallest), which the artifact records. A net with one curve for
    every class (``num_heads == 1``) is warned from ``STRONG_TAIL_ONE_CURVE`` on.
    """
    counts = [float(c) for c in class_counts if c > 0]
    if len(counts) < 2:
        return None
    target_if = max(counts) / min(counts)
    centers = [float(c) for c in (source_centers or []) if c > 0]
    source_if = max(centers) / min(centers) if len(centers) >= 2 else 1.0
    if target_if < (STRONG_TAIL if num_heads > 1 else STRONG_TAIL_ONE_CURVE) or target_if < 2.0 * source_if:
        return None
    return (f"the target is a strong long tail (imbalance factor {target_if:.0f}, the net's source about "
            f"{source_if:.1f}): there the high losses are largely clean tail samples, which a frozen net "
            "down-weights, and it does not re-balance classes; compare with --weighting class-balanced")


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share their mean rank), for a Spearman correlation without scipy."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None when either side is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def trust_verdict(class_means: Sequence[float | None], class_counts: Sequence[float]) -> dict:
    """Is the frozen net fit for this target? Judged on what it *would* give at the end of the CE warm-up.

    ``size_weight_corr``: Spearman's correlation between the classes' sample counts and the net's mean weight per
    class. A net that gives the rare classes of a long tail *less* weight than the frequent ones (a high positive
    correlation on a target whose counts span ``TRUST_MIN_SPREAD``) deepens the imbalance it was meant to survive.
    """
    seen = [(float(m), float(class_counts[c]), c) for c, m in enumerate(class_means)
            if m is not None and class_counts[c] > 0]
    out: dict = {"verdict": "trust", "reasons": []}
    if len(seen) >= 3:
        means = sorted(m for m, _, _ in seen)
        median = means[len(means) // 2]
        low, _, low_class = min(seen)
        counts = [n for _, n, _ in seen]
        out.update(class_ratio=low / median if median > 0 else None, lowest_class=low_class,
                   mean_weight=sum(means) / len(means), count_spread=max(counts) / min(counts),
                   size_weight_corr=spearman(counts, [m for m, _, _ in seen]))
        corr = out["size_weight_corr"]
        if corr is not None and corr >= TRUST_SIZE_CORR and out["count_spread"] >= TRUST_MIN_SPREAD:
            out["reasons"].append(f"it would give the rare classes less weight than the frequent ones (rank "
                                  f"correlation of class size and weight {corr:+.2f})")
    if out["reasons"]:
        out["verdict"] = "distrust"
    return out


def lift_class_floor(weights: torch.Tensor, targets: torch.Tensor, num_classes: int, floor: float) -> torch.Tensor:
    """Weights whose per-class batch mean is at least ``floor`` x the batch mean.

    A class below the floor gets ``w + (1 - w) * a`` with ``a`` chosen so its mean reaches the floor exactly:
    increasing in ``w`` (the ranking inside the class is kept) and inside [0, 1]. Classes at or above the floor
    are untouched. ``floor = 0`` is the identity.
    """
    if floor <= 0 or weights.numel() == 0:
        return weights
    w = weights.float()
    counts = torch.bincount(targets, minlength=num_classes).to(w.dtype)
    sums = torch.bincount(targets, weights=w, minlength=num_classes)
    means = sums / counts.clamp_min(1)
    target = min(float(floor), 1.0) * w.mean()
    lift = ((target - means) / (1 - means).clamp_min(1e-12)).clamp(min=0.0, max=1.0)
    a = lift[targets]
    return (w + (1 - w) * a).to(weights.dtype)


def reference_weight(net: torch.nn.Module, loss_range: dict | None, heads: torch.Tensor) -> float | None:
    """The net's mean weight, over the heads the target uses, at the source's median loss (None: no range)."""
    if not loss_range or "p50" not in loss_range:
        return None
    heads = torch.unique(heads.cpu())
    device = next(net.parameters()).device
    with torch.no_grad():
        w = net(torch.full((heads.numel(),), float(loss_range["p50"]), device=device), heads.to(device))
    return float(w.mean())


@dataclass
class WarmupGate:
    """Decides, epoch by epoch, whether the frozen net is applied (``mode``: ``"auto"`` or a fixed epoch count).

    In ``auto`` mode the epochs before the net is applied accumulate (on device) the mean weight the net *would*
    give; after an epoch whose mean reaches ``READY_FRACTION x reference``, weighting starts with the next one.
    ``start_epoch`` (1-based: the first weighted epoch) is what the run logs and saves.
    """

    mode: str | int
    epochs: int
    reference: float | None = None
    start_epoch: int | None = None
    disabled: bool = False  # the trust check fell back: plain CE for the rest of the run
    _sum: torch.Tensor | None = field(default=None, repr=False)
    _count: int = 0

    def __post_init__(self) -> None:
        if self.mode != "auto":
            self.start_epoch = int(self.mode) + 1
        elif self.reference is None:  # no recorded loss range: a fixed share of the run
            self.start_epoch = self.cap_epoch

    @property
    def cap_epoch(self) -> int:
        return max(2, math.ceil(AUTO_CAP * self.epochs) + 1)

    def applies(self, epoch: int) -> bool:
        """Is the net applied in (1-based) ``epoch``?"""
        return not self.disabled and self.start_epoch is not None and epoch >= self.start_epoch

    def observe(self, would_be_weights: torch.Tensor) -> None:
        w = would_be_weights.detach().float().sum()
        self._sum = w if self._sum is None else self._sum + w
        self._count += would_be_weights.numel()

    def observe_mean(self, mean: float | None, count: int = 1) -> None:
        """An epoch's mean would-be weight, already reduced (over ranks, say)."""
        if mean is not None:
            self.observe(torch.full((count,), float(mean)))

    def end_epoch(self, epoch: int) -> float | None:
        """Close (1-based) ``epoch``; returns its mean would-be weight (None when nothing was observed)."""
        mean = float(self._sum) / self._count if self._sum is not None and self._count else None
        self._sum, self._count = None, 0
        if self.start_epoch is None:
            ready = mean is not None and self.reference is not None and mean >= READY_FRACTION * self.reference
            if ready or epoch + 1 >= self.cap_epoch:
                self.start_epoch = epoch + 1
        return mean

    def state_dict(self) -> dict:
        return {"mode": self.mode, "epochs": self.epochs, "reference": self.reference, "start_epoch": self.start_epoch,
                "disabled": self.disabled}

    def load_state_dict(self, state: dict) -> None:
        self.start_epoch = state["start_epoch"]
        self.disabled = bool(state.get("disabled", False))


class ClassWeightMonitor:
    """Per-class sums of applied weights over an epoch (on device); names the classes left far below the rest.

    With the losses it also keeps the pooled within-class covariance of weight and loss: positive means that
    inside a class the net gives *more* weight to higher losses (it takes them for clean samples). Across classes
    the sign would say nothing: tail classes have both higher losses and, by design, higher weights.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.table = torch.zeros(4, num_classes, dtype=torch.float64, device=device)  # w, n, loss, w*loss

    @property
    def sums(self) -> torch.Tensor:
        return self.table[0]

    @property
    def counts(self) -> torch.Tensor:
        return self.table[1]

    def observe(self, weights: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        if self.table.device != weights.device:
            self.table = self.table.to(weights.device)
        w = weights.detach().double()
        rows = [w, torch.ones_like(w)]
        if losses is not None:
            ld = losses.detach().double()
            rows += [ld, w * ld]
        for i, values in enumerate(rows):
            self.table[i] += torch.bincount(targets, weights=values, minlength=self.num_classes)

    def to(self, device: torch.device | str) -> None:
        self.table = self.table.to(device)

    def reduce(self) -> None:
        """Sum over DDP ranks (no-op without an initialised process group)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.table)

    def within_class_cov(self) -> float | None:
        """Pooled within-class covariance of weight and loss (None before any loss was observed)."""
        w, n, loss, wl = self.table
        total = float(n.sum())
        if total == 0 or float(loss.abs().sum()) == 0:
            return None
        seen = n > 0
        return float((wl[seen] - w[seen] * loss[seen] / n[seen]).sum()) / total

    def class_means(self) -> list[float | None]:
        return [None if c == 0 else s / c for s, c in zip(self.sums.tolist(), self.counts.tolist())]

    def starved(self, fraction: float = STARVED_FRACTION) -> list[int]:
        """Classes whose mean weight is below ``fraction`` x the median class mean."""
        means = [m for m in self.class_means() if m is not None]
        if not means:
            return []
        median = sorted(means)[len(means) // 2]
        return [c for c, m in enumerate(self.class_means()) if m is not None and m < fraction * median]

    def reset(self) -> None:
        self.table.zero_()


def range_bounds(loss_range: dict | None) -> tuple[float | None, float | None]:
    """The source range a net's losses are checked against: its min and max (p1 and p99 when those are missing)."""
    if not loss_range:
        return None, None
    return loss_range.get("min", loss_range.get("p1")), loss_range.get("max", loss_range.get("p99"))


class LossRangeMonitor:
    """Fractions of the losses the net sees below and above the range it was meta-trained on; summed over ranks.

    Both sides matter: above the source's maximum are harder samples than any the net saw, below its minimum
    more confident ones (a target fitted further than the source ever was); either way the weights are
    extrapolated.
    """

    def __init__(self, loss_range: dict | None, device: torch.device | str = "cpu") -> None:
        self.low, self.high = range_bounds(loss_range)
        self.stats = torch.zeros(3, dtype=torch.float64, device=device)  # below, above, total

    @property
    def checked(self) -> bool:
        return self.low is not None and self.high is not None

    def to(self, device: torch.device | str) -> None:
        self.stats = self.stats.to(device)

    def observe(self, losses: torch.Tensor) -> None:
        if not self.checked:
            return
        losses = losses.detach()
        if self.stats.device != losses.device:
            self.stats = self.stats.to(losses.device)
        self.stats += torch.stack([(losses < self.low).sum().double(), (losses > self.high).sum().double(),
                                   torch.tensor(float(losses.numel()), device=losses.device, dtype=torch.float64)])

    def report(self) -> dict:
        """``{"loss_range_check": "unchecked"}`` or the fractions outside (reduced over ranks), then reset:
        ``frac_outside_range`` = ``frac_below_range`` + ``frac_above_range``."""
        if not self.checked:
            return {"loss_range_check": "unchecked"}
        stats = self.stats.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        self.stats.zero_()
        below, above, total = stats.tolist()
        if not total:
            return {}
        return {"loss_range_check": "checked", "frac_outside_range": (below + above) / total,
                "frac_below_range": below / total, "frac_above_range": above / total}


def describe_range_sides(report: dict) -> str:
    """Which side of the source range the losses left, for a warning: "12.0% above its max, 1.5% below its min"."""
    parts = [f"{100 * report[key]:.1f}% {side}" for key, side in (("frac_above_range", "above its maximum"),
                                                                  ("frac_below_range", "below its minimum"))
             if report.get(key)]
    return ", ".join(parts)

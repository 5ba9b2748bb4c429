"""PMD feature-dependent noise (PLC, Zhang et al. 2021): labels move only to the classifier's runner-up class.

For each sample with class-probability row ``eta``: ``u`` = top-1 class, ``s`` = top-2 class (ties broken by
the lower class index), ``Delta = eta_u - eta_s``. The new label is ``u`` with probability
``min(p_u / factor, 1)`` and ``s`` otherwise, where ``p_u = 1 - tau(Delta)``:

* Type-I   ``tau = 1/2 - Delta^2/2``                     -> ``p_u = 1/2 + Delta^2/2``
* Type-II  ``tau = 1 - |Delta|^3``                      -> ``p_u = |Delta|^3``
* Type-III ``tau = 1 - (|Delta|^3 + |Delta|^2 + |Delta|)/3`` -> ``p_u = (|Delta|^3 + |Delta|^2 + |Delta|)/3``

(reference-implementations.md §3). The label never depends on the given label, only on ``eta``; the noise
rate is measured against the given (clean) labels. A larger ``factor`` means more noise. PLC's factors for a
35% rate on CIFAR-10 are 1.43 / 1.32 / 1.35; here the factor for a target rate is found by bisection
(:func:`pmd_factor_for_rate`) because it depends on how good the eta classifier is.

Machine stability: given eta, every step uses only correctly rounded IEEE operations (``+ - * /``, ``sqrt``,
``min``; ``d*d*d`` rather than ``pow``), exact sums (``math.fsum``) and a geometric bisection through ``sqrt``
(no ``exp``/``log``, whose last bits depend on the CPU's libm variant), so the labels are the same bits on
every machine.
"""

from __future__ import annotations

import math

import numpy as np

from cmw_transfer.bias.result import NoiseResult, check_labels, check_rate, realised
from cmw_transfer.errors import UserError

PMD_TYPES = (1, 2, 3)
FACTOR_MIN = 1e-6
FACTOR_MAX = 1e6


def _check_eta(eta: np.ndarray, n: int) -> np.ndarray:
    eta = np.asarray(eta, dtype=np.float64)
    if eta.ndim != 2 or eta.shape[0] != n or eta.shape[1] < 2:
        raise UserError(f"eta must be [N={n}, C>=2] class probabilities, got shape {eta.shape}")
    if not np.all(np.isfinite(eta)) or np.any(eta < 0):
        raise UserError("eta must hold finite, non-negative probabilities")
    sums = eta.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise UserError("every row of eta needs a positive probability mass")
    return eta / sums


def keep_probability(delta: np.ndarray, noise_type: int) -> np.ndarray:
    """``p_u = 1 - tau(Delta)``: the chance (before dividing by the factor) of keeping the top-1 class."""
    d = np.abs(np.asarray(delta, dtype=np.float64))
    d2 = d * d
    d3 = d2 * d
    if noise_type == 1:
        return 0.5 + 0.5 * d2
    if noise_type == 2:
        return d3
    if noise_type == 3:
        return (d3 + d2 + d) / 3.0
    raise UserError(f"PMD noise type must be 1, 2 or 3 (Type-I/II/III), got {noise_type!r}")


def top2(eta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(u, s, Delta)`` per row; a stable sort makes ties go to the lower class index."""
    order = np.argsort(-eta, axis=1, kind="stable")[:, :2]
    u, s = order[:, 0], order[:, 1]
    rows = np.arange(eta.shape[0])
    return u, s, eta[rows, u] - eta[rows, s]


def pmd_noise(
    labels: np.ndarray | list[int], eta: np.ndarray, noise_type: int, factor: float, *, seed: int = 0
) -> NoiseResult:
    """Draw PMD labels from ``eta`` (module docstring); the rate is measured against ``labels``."""
    eta = _check_eta(eta, len(labels))
    y = check_labels(labels, eta.shape[1])
    if not np.isfinite(factor) or factor <= 0:
        raise UserError(f"PMD factor must be a positive number, got {factor!r}")
    u, s, delta = top2(eta)
    q = np.minimum(keep_probability(delta, int(noise_type)) / float(factor), 1.0)
    keep = np.random.default_rng(seed).random(y.size) < q
    return realised(y, np.where(keep, u, s), eta.shape[1])


def _rate_curve(labels: np.ndarray, eta: np.ndarray, noise_type: int):  # -> rate(factor) closure
    eta = _check_eta(eta, len(labels))
    y = check_labels(labels, eta.shape[1])
    u, s, delta = top2(eta)
    p_u = keep_probability(delta, int(noise_type))
    miss_u, miss_s = (u != y).astype(np.float64), (s != y).astype(np.float64)

    def rate(factor: float) -> float:
        q = np.minimum(p_u / float(factor), 1.0)
        return math.fsum(q * miss_u + (1.0 - q) * miss_s) / y.size if y.size else 0.0

    return rate


def expected_pmd_rate(labels: np.ndarray, eta: np.ndarray, noise_type: int, factor: float) -> float:
    """Expected ``mean(new != labels)`` of :func:`pmd_noise` for a factor (no sampling)."""
    return _rate_curve(labels, eta, noise_type)(factor)


def pmd_factor_for_rate(
    labels: np.ndarray, eta: np.ndarray, noise_type: int, rate: float, *, iters: int = 200
) -> float:
    """The factor whose *expected* PMD noise rate equals ``rate``: geometric bisection (midpoint ``sqrt(lo*hi)``).

    Factors >= 1 (the paper's range) are searched first; a rate below what factor 1 gives is reached with
    factors < 1, where ``p_u / factor`` is clipped at 1. A rate outside
    [rate(factor -> 0), rate(factor -> inf)] = [top-1 error, top-2 error] of eta cannot be produced.
    """
    rate = check_rate(rate, "PMD noise rate")
    curve = _rate_curve(labels, eta, noise_type)
    lo_rate, hi_rate = curve(FACTOR_MIN), curve(FACTOR_MAX)
    if not lo_rate - 1e-9 <= rate <= hi_rate + 1e-9:
        raise UserError(f"PMD Type-{noise_type} noise can only reach rates in [{lo_rate:.3f}, {hi_rate:.3f}] with "
                        "this eta (how often its top-1 / top-2 class differs from the label); ask for a rate in that "
                        "range, or use a better eta classifier (e.g. more epochs) if the lower end is too high")
    lo, hi = (1.0, FACTOR_MAX) if rate >= curve(1.0) else (FACTOR_MIN, 1.0)
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if curve(mid) < rate:
            lo = mid
        else:
            hi = mid
        if hi <= lo * (1.0 + 1e-12):
            break
    return math.sqrt(lo * hi)

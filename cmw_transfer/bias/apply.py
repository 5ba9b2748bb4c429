"""Inject a :class:`BiasSpec` into a dataset, in one documented order.

1. Long-tail subsampling (``imbalance``) on the ground-truth labels, so "IF" describes the true classes.
2. Noise steps left to right, each applied to the previous step's labels (PMD, if present, is first and
   draws from eta alone; e.g. ``pmd1:0.35+asym:0.3`` = the paper's hybrid source).

Ground truth is ``clean_targets`` when known, else the observed labels (for web data the injected noise is
then measured against the web labels). The result has ``clean_targets`` set, ``bias`` = the spec and
``bias_log`` = one dict per step with its realised numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cmw_transfer.bias.eta import estimate_eta
from cmw_transfer.bias.imbalance import long_tail_indices
from cmw_transfer.bias.noise import asymmetric_noise, symmetric_noise
from cmw_transfer.bias.pmd import pmd_factor_for_rate, pmd_noise
from cmw_transfer.bias.spec import BiasSpec, format_step

if TYPE_CHECKING:
    from cmw_transfer.bias.labeled import Labeled

# The asymmetric map a plain ``asym:RATE`` (or ``asym:RATE:auto``) uses on each dataset; anything not listed gets
# the pair-flip.
DEFAULT_ASYM_MAPS = {"digits": "digits", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10", "cifar100": "cifar100"}


def default_asym_map(dataset_name: str) -> str:
    return DEFAULT_ASYM_MAPS.get(dataset_name, "pairflip")


def step_seed(seed: int, step: int) -> int:
    """Independent, reproducible stream per step (step 0 = long-tail subsampling)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0])


def apply_bias(
    ds: Labeled,
    bias: BiasSpec,
    *,
    seed: int = 0,
    eta: np.ndarray | None = None,
    eta_options: dict[str, Any] | None = None,
) -> Labeled:
    """A biased copy of ``ds`` (order in the module docstring).

    ``eta`` (``[len(ds), C]``) skips :func:`estimate_eta` for a PMD step; ``eta_options`` are passed to it.
    """
    truth = ds.clean_targets if ds.clean_targets is not None else ds.targets
    log: list[dict] = []
    if bias.imbalance is not None:
        keep = long_tail_indices(truth, ds.num_classes, bias.imbalance, seed=step_seed(seed, 0))
        ds, truth = ds.subset(keep), truth[keep]
        eta = None if eta is None else np.asarray(eta)[keep]
        counts = np.bincount(truth, minlength=ds.num_classes)
        log.append({"step": f"imbalance:{bias.imbalance:g}", "kept": int(keep.size),
                    "max_count": int(counts.max()), "min_count": int(counts.min())})
    labels = ds.targets.copy()
    for k, step in enumerate(bias.noise, start=1):
        entry: dict[str, Any] = {"step": format_step(step)}
        if step[0] == "pmd":
            if eta is None:
                options = {"seed": seed, **(eta_options or {})}
                eta = estimate_eta(ds.with_targets(ds.targets, clean_targets=truth), **options)
            factor = pmd_factor_for_rate(truth, eta, step[1], step[2])
            result = pmd_noise(truth, eta, step[1], factor, seed=step_seed(seed, k))
            entry["factor"] = round(factor, 6)
        elif step[0] == "sym":
            result = symmetric_noise(labels, ds.num_classes, step[1], include_true=len(step) > 2 and step[2] == "incl",
                                     seed=step_seed(seed, k))
        else:
            mapping = step[2] if len(step) > 2 and step[2] != "auto" else default_asym_map(ds.name)
            result = asymmetric_noise(labels, ds.num_classes, step[1], mapping=mapping, seed=step_seed(seed, k))
            entry["map"] = mapping
        entry["step_rate"] = round(float(np.mean(result.labels != labels)), 6)
        labels = result.labels
        entry["noise_rate"] = round(float(np.mean(labels != truth)), 6)
        log.append(entry)
    out = ds.with_targets(labels, clean_targets=truth)
    out.bias = bias
    out.bias_log = tuple(ds.bias_log) + tuple(log)
    return out

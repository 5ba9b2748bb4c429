"""Weight-versus-loss curves per family: the table in the model card, `inspect`, and the Fig. 3 style plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.atomic import atomic_path

TABLE_LOSSES = (0.0, 0.5, 1.0, 2.0, 3.0, 6.0, 10.0)


def family_names(num_heads: int) -> list[str]:
    if num_heads == 1:
        return ["all"]
    if num_heads == 3:
        return ["small", "medium", "large"]
    return [f"size-rank-{i}" for i in range(num_heads)]


def loss_grid(net: CMWNet, points: int = 200) -> np.ndarray:
    """A grid that covers the source run's loss range when it is known."""
    top = max(10.0, float((net.loss_range or {}).get("max", 0.0)))
    return np.linspace(0.0, top, points)


def curves_table(net: CMWNet, losses: tuple[float, ...] = TABLE_LOSSES) -> dict[str, dict[str, float]]:
    weights = net.curves(list(losses))
    return {name: {f"{loss:g}": round(float(w), 4) for loss, w in zip(losses, row)}
            for name, row in zip(family_names(net.num_heads), weights)}


def default_title(net: CMWNet) -> str:
    prov = net.provenance or {}
    if "method" in prov and "source" in prov:
        return f"{prov['method']} on {prov['source']}"
    return str(prov.get("source", "CMW-Net weighting curves"))


def plot_curves(net: CMWNet, path: str | Path, title: str | None = None) -> None:
    """Draw weight vs loss for every family and write a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = loss_grid(net)
    weights = net.curves(grid)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    centers = net.centers or [None] * net.num_heads
    for name, row, center in zip(family_names(net.num_heads), weights, centers):
        label = name if center is None else f"{name} (center {center:.0f})"
        ax.plot(grid, row, label=label, linewidth=2)
    if net.loss_range and {"p1", "p99"} <= set(net.loss_range):
        ax.axvspan(net.loss_range["p1"], net.loss_range["p99"], color="0.9", label="source loss p1-p99")
    ax.set_xlabel("per-sample training loss")
    ax.set_ylabel("weight")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or default_title(net))
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

"""The training-curve figure of an apply run (``training.png``): loss, test top-1, mean weights per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmw_transfer.atomic import atomic_path


def plot_training(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per epoch: training loss; train and test top-1; mean weight of clean vs noisy samples (when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> list[float]:
        return [r[key] if r.get(key) is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, series("train_loss"), marker="o", label="train loss")
    axes[0].set_ylabel("loss")
    axes[1].plot(epochs, series("train_acc"), marker="o", label="train top-1")
    if any("test_top1" in r for r in rows):
        axes[1].plot(epochs, series("test_top1"), marker="o", label="test top-1")
    axes[1].set_ylabel("top-1 (%)")
    for key, label in (("mean_weight", "all"), ("mean_weight_clean", "clean"), ("mean_weight_noisy", "noisy")):
        if any(key in r for r in rows):
            axes[2].plot(epochs, series(key), marker="o", label=label)
    axes[2].set_ylabel("mean weight")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

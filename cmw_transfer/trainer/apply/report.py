"""What an apply run reports: the console lines, the summary, and the training-curve figure (``training.png``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmw_transfer.atomic import atomic_path
from cmw_transfer.progress import progress_write

if TYPE_CHECKING:
    from cmw_transfer.trainer.apply.setup import RunSetup


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


# -- console and summary ------------------------------------------------------------------------------------------
def summary(s: RunSetup, final_eval: dict[str, Any], best: dict[str, Any], rows: list[dict[str, Any]],
             seconds: float) -> dict[str, Any]:
    cfg = s.cfg
    if not final_eval and rows:  # resumed after the last epoch: report what the log holds
        labels = ("test", "open", *(item.partition("=")[0] for item in cfg.extra_eval))
        final_eval = {k: v for k, v in rows[-1].items() if k.split("_", 1)[0] in labels}
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return {
        "out": str(s.out),
        "dataset": cfg.dataset,
        "model": cfg.model,
        "weighting": cfg.weighting,
        "soft_labels": cfg.soft_labels,
        "weights": cfg.weights,
        "trainer": cfg.trainer,
        "epochs": cfg.total_epochs(),
        "world_size": s.ctx.world_size,
        "final": final_eval,
        "best_test_top1": best["top1"],
        "best_epoch": best["epoch"],
        "families_per_head": s.families["classes_per_head"] if s.families else None,
        "images_per_s": float(np.median(speeds)) if speeds else None,
        "seconds_this_session": seconds,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def epoch_line(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {_fmt(row.get('train_loss'))}", f"train {_fmt(row.get('train_acc'))}%"]
    if "stage" in row:
        parts.insert(1, f"stage {row['stage']}")
    if "mean_weight" in row:
        parts.append(f"w {row['mean_weight']:.3f}")
    if "test_top1" in row:
        parts.append(f"test top1 {_fmt(row['test_top1'])} top5 {_fmt(row.get('test_top5'))}")
    if "open_f1" in row:
        parts.append(f"open F {_fmt(row['open_f1'])}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    return " | ".join(parts)




def describe_start(s: RunSetup, start_epoch: int) -> None:
    cfg, ctx, train_ds, families, net = s.cfg, s.ctx, s.train_ds, s.families, s.net
    noise = train_ds.noise_rate() if hasattr(train_ds, "noise_rate") else None
    realised = f", realised noise {100 * noise:.1f}%" if noise is not None else ""
    progress_write(f"apply: {train_ds.describe()}{realised}; model {cfg.model}; trainer {cfg.trainer}; "
                   f"weighting {cfg.weighting}{' + soft labels' if cfg.soft_labels else ''}; "
                   f"world size {ctx.world_size}; device {ctx.device}")
    if families is not None and net is not None:
        progress_write(f"families: centers {[round(c, 1) for c in families['centers']]} -> classes per head "
                       f"{families['classes_per_head']} (source centers {net.centers})")
    if start_epoch:
        progress_write(f"resuming after epoch {start_epoch}")
    if s.open_ds is not None:
        held = f" (held-out classes {list(cfg.open_classes)})" if cfg.open_classes else ""
        progress_write(f"open set: {len(s.open_ds)} unknown samples{held}, rejected below the reachability "
                       + (f"{cfg.open_threshold}" if cfg.open_threshold is not None else
                          f"accepting {100 * cfg.open_accept:g}% of the known test samples"))

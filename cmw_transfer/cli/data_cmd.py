"""``cmw-transfer data``: what a dataset spec gives you before you train on it.

Counts samples and classes from the label lists alone (no image is opened), fits the K class-size families
the weighting net will see (:func:`cmw_transfer.artifact.scales.fit_families`) and, where the ground truth
is known, reports the realised noise rate of the injected bias.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from cmw_transfer.cli.options import FAMILIES, IMBALANCE, SEED, emit
from cmw_transfer.cli.text import printable
from cmw_transfer.errors import UserError

if TYPE_CHECKING:
    from cmw_transfer.dataset import LabeledDataset

MAX_LISTED_CLASSES = 20


def describe_dataset(ds: LabeledDataset, spec: str, k: int) -> dict:
    """The JSON-able summary ``data`` prints: counts, families, noise."""
    from cmw_transfer.artifact.curves import family_names
    from cmw_transfer.artifact.scales import DegenerateScalesWarning, fit_families
    from cmw_transfer.dataset.classes import empty_classes, nonempty_classes

    counts = ds.class_counts()
    present = nonempty_classes(counts)  # empty classes have no size: they join no family
    with warnings.catch_warnings(record=True) as caught:  # an inspection command reports the rule in its output
        warnings.simplefilter("always", DegenerateScalesWarning)
        centers, present_family = fit_families(counts[present], k)
    notes = [str(w.message) for w in caught if issubclass(w.category, DegenerateScalesWarning)]
    family = np.full(counts.size, -1, dtype=np.int64)
    family[present] = present_family
    empty = empty_classes(counts)
    names = family_names(k)
    per_class_noise = None
    if ds.clean_targets is not None:
        wrong = np.bincount(ds.clean_targets[ds.targets != ds.clean_targets], minlength=ds.num_classes)
        true_counts = np.bincount(ds.clean_targets, minlength=ds.num_classes)
        per_class_noise = [round(float(w / t), 4) if t else None for w, t in zip(wrong, true_counts, strict=True)]
    families = []
    for head in range(k):
        members = np.flatnonzero(family == head)
        families.append({
            "head": head, "name": names[head], "center": round(float(centers[head]), 3),
            "num_classes": int(members.size),
            "min_count": int(counts[members].min()) if members.size else None,
            "max_count": int(counts[members].max()) if members.size else None,
        })
    noise = ds.noise_rate()
    return {
        "dataset": spec,
        "name": ds.name,
        "split": ds.split,
        "files": None if ds.root is None else str(ds.root),
        "bias": str(ds.bias) if ds.bias is not None else "none",
        "bias_steps": list(ds.bias_log),
        "num_samples": len(ds),
        "labels_digest": ds.labels_digest(),
        "num_classes": ds.num_classes,
        "class_names": ds.classes,
        "class_counts": counts.tolist(),
        "families": families,
        "family_of_class": [None if f < 0 else int(f) for f in family],
        "empty_classes": empty.tolist(),
        "num_empty_classes": int(empty.size),
        "noise_rate": None if noise is None else round(noise, 6),
        "class_noise_rate": per_class_noise,
        "families_note": notes[0] if notes else None,
    }


def plot_class_sizes(info: dict, path: Path) -> None:
    """Histogram of class sizes, one colour per family, centers as dashed lines; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmw_transfer.atomic import atomic_path

    counts = np.asarray(info["class_counts"])
    family = np.asarray([-1 if f is None else f for f in info["family_of_class"]])
    fams = info["families"]
    bins = np.histogram_bin_edges(counts, bins=min(50, max(10, counts.size // 4)))
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    colors = plt.get_cmap("tab10").colors
    ax.hist([counts[family == f["head"]] for f in fams], bins=bins, stacked=True,
            color=[colors[f["head"] % 10] for f in fams],
            label=[f"{f['name']} ({f['num_classes']} classes)" for f in fams])
    for f in fams:
        ax.axvline(f["center"], color=colors[f["head"] % 10], linestyle="--", linewidth=1)
    ax.set_xlabel("samples per class (observed labels)")
    ax.set_ylabel("classes")
    title = f"{info['dataset']} [{info['split']}]"
    if info["noise_rate"] is not None:
        title += f", noise {100 * info['noise_rate']:.1f}%"
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _print_text(info: dict) -> None:
    click.echo(printable(f"dataset:     {info['dataset']} ({info['name']}, split {info['split']})"))
    if info.get("files"):
        click.echo(printable(f"files:       {info['files']}"))
    click.echo(f"bias:        {info['bias']}")
    for step in info["bias_steps"]:
        extras = ", ".join(f"{k}={v}" for k, v in step.items() if k != "step")
        click.echo(f"  {step['step']:<16}{extras}")
    click.echo(f"samples:     {info['num_samples']} (labels digest {info['labels_digest']})")
    click.echo(f"classes:     {info['num_classes']}")
    if info["num_empty_classes"]:
        from cmw_transfer.dataset.classes import describe_empty_classes

        click.echo(f"empty:       {describe_empty_classes(np.asarray(info['class_counts']))}; they join no family "
                   "and training leaves them out")
    noise = info["noise_rate"]
    click.echo("noise rate:  " + ("unknown (no ground truth)" if noise is None else f"{100 * noise:.2f}%"))
    click.echo("families:" + (f" ({info['families_note']})" if info.get("families_note") else ""))
    for f in info["families"]:
        span = "" if f["min_count"] is None else f"  counts {f['min_count']}..{f['max_count']}"
        click.echo(f"  head {f['head']}  {f['name']:<8} center {f['center']:>10.1f}  "
                   f"{f['num_classes']:>5} classes{span}")
    counts = info["class_counts"]
    if len(counts) <= MAX_LISTED_CLASSES:
        click.echo("classes:")
        names = info["class_names"] or [str(c) for c in range(len(counts))]
        noise_by_class = info["class_noise_rate"]
        for c, count in enumerate(counts):
            head = info["family_of_class"][c]
            fam = "empty" if head is None else info["families"][head]["name"]
            extra = ""
            if noise_by_class is not None and noise_by_class[c] is not None:
                extra = f"  noise {100 * noise_by_class[c]:5.1f}%"
            click.echo(f"  {c:>3} {printable(names[c][:16]):<16} {count:>8}  {fam}{extra}")
    else:
        arr = np.asarray(counts)
        arr = arr[arr > 0] if arr.any() else arr
        click.echo(f"class counts: min {arr.min()}, median {int(np.median(arr))}, max {arr.max()}"
                   + (" (non-empty classes)" if info["num_empty_classes"] else ""))


@click.command("data")
@click.option("--dataset", "spec", required=True, metavar="SPEC",
              help="digits, fashion-mnist, mnist, kmnist, cifar10, cifar100, webvision-full, mini-webvision, "
                   "imagenet-lt, clothing1m, animal-10n, digits-pmd, fashion-mnist-pmd, cifar10-pmd, list:PATH or "
                   "folder:PATH.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the dataset's files (not needed for digits; fashion-mnist: --data-dir, then "
                   "CMW_DATA_DIR, then FashionMNIST/raw under either, then /usr/share/datasets/fashion-mnist).")
@click.option("--split", default="train", show_default=True, help="Which split to describe.")
@click.option("--noise", default=None, metavar="STEPS",
              help="Inject label noise, e.g. sym:0.4, asym:0.3, pmd1:0.35+asym:0.3 (steps left to right).")
@click.option("--imbalance", type=IMBALANCE, default=None, metavar="IF",
              help="Long-tail subsampling with imbalance factor IF (largest/smallest class), applied before noise.")
@click.option("--families", "k", type=FAMILIES, default=3, show_default=True, help="Number of class-size families K.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the bias generators.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a histogram of class sizes coloured by family as a PNG.")
def data_cmd(spec: str, data_dir: Path | None, split: str, noise: str | None, imbalance: float | None, k: int,
             seed: int, as_json: bool, plot_path: Path | None) -> None:
    """Samples, classes, class counts, the K size families and the realised noise of a dataset spec."""
    from cmw_transfer.dataset import create_dataset

    ds = create_dataset(spec, data_dir, split, noise=noise, imbalance=imbalance, seed=seed, allow_empty_classes=True)
    if not len(ds):
        raise UserError(f"{spec} [{split}] has no samples")
    info = describe_dataset(ds, spec, k)
    if plot_path is not None:
        plot_class_sizes(info, plot_path)
    emit(info, as_json, _print_text, plot_path)

"""``create_dataset(spec, ...)``: dataset names, source presets and the bias options in one place.

A spec is a dataset name (``digits``, ``cifar10``, ...), ``list:PATH`` / ``folder:PATH``, or a biased source
preset (``digits-pmd``, ``cifar10-pmd``). Presets expand to a base dataset plus noise steps; ``--noise``
steps are appended after the preset's, ``--imbalance`` applies first (see
:func:`cmw_transfer.bias.apply_bias`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmw_transfer.bias.spec import BiasSpec, parse_noise
from cmw_transfer.dataset.base import LabeledDataset
from cmw_transfer.errors import UserError

DATASETS = ("digits", "fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "webvision-full", "mini-webvision",
            "imagenet-lt", "clothing1m", "animal-10n")
PATTERNS = ("list:PATH", "folder:PATH")

# The paper's transfer source (reference-implementations.md §1.2): PMD Type-I 35% on clean labels, then the
# CIFAR-10 asymmetric map at 30%. digits-pmd and fashion-mnist-pmd are the same recipe on the embedded digits and
# on Fashion-MNIST (each with its own asymmetric map, cmw_transfer/bias/maps.py).
PRESETS = {
    "cifar10-pmd": ("cifar10", "pmd1:0.35+asym:0.3"),
    "digits-pmd": ("digits", "pmd1:0.35+asym:0.3"),
    "fashion-mnist-pmd": ("fashion-mnist", "pmd1:0.35+asym:0.3"),
}


def list_datasets() -> list[str]:
    """Every accepted spec: dataset names, source presets and the two path patterns."""
    return [*DATASETS, *PRESETS, *PATTERNS]


def _unknown(spec: str) -> UserError:
    return UserError(f"unknown dataset {spec!r}; known: {', '.join(list_datasets())}")


def resolve_source(spec: str, noise: str | None = None, imbalance: float | None = None) -> tuple[str, BiasSpec]:
    """Split a spec into the base dataset name and the bias to inject (preset steps, then ``noise`` steps)."""
    spec = str(spec).strip()
    base, preset_noise = PRESETS.get(spec, (spec, ""))
    if not (base in DATASETS or base.startswith(("list:", "folder:"))):
        raise _unknown(spec)
    if base.startswith(("list:", "folder:")) and not base.split(":", 1)[1]:
        raise UserError(f"{spec!r} needs a path, e.g. {base}/data/train.txt")
    steps = parse_noise(preset_noise) + parse_noise(noise)
    return base, BiasSpec(noise=steps, imbalance=imbalance)


def check_source_exists(base: str) -> None:
    """A ``list:`` / ``folder:`` base whose file or folder is missing: the loader's own "not found" line, said
    before any check that presumes the data is there (e.g. "has no built-in test split")."""
    from cmw_transfer.dataset.formats import folders

    if base.startswith("list:"):
        folders.list_file(base[5:])
    elif base.startswith("folder:"):
        folders.folder_root(base[7:])


def _loader(name: str) -> Callable[..., LabeledDataset]:
    from cmw_transfer.dataset.formats import cifar, clothing1m, digits, folders, imagenet_lt, mnist, webvision

    if name == "digits":
        return lambda root, split, **kw: digits.load(root, split, **kw)
    if name in mnist.NAMES:
        return lambda root, split, **kw: mnist.load(name, root, split, **kw)
    if name in ("cifar10", "cifar100"):
        return lambda root, split, **kw: cifar.load(name, root, split, **kw)
    if name in ("webvision-full", "mini-webvision"):
        return lambda root, split, **kw: webvision.load(name, root, split, **kw)
    if name == "imagenet-lt":
        return imagenet_lt.load
    if name == "clothing1m":
        return clothing1m.load
    if name == "animal-10n":
        return folders.load_animal10n
    if name.startswith("list:"):
        return lambda root, split, **kw: folders.load_list(name[5:], root, split, **kw)
    if name.startswith("folder:"):
        return lambda root, split, **kw: folders.load_folder(name[7:], split, **kw)
    raise _unknown(name)


def create_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    transform: Callable | None = None,
    noise: str | None = None,
    imbalance: float | None = None,
    seed: int = 0,
    strict: bool = False,
    download: bool = True,
    eta_options: dict[str, Any] | None = None,
    allow_empty_classes: bool = False,
) -> LabeledDataset:
    """Load ``name`` (a spec, see module docstring) from ``root`` and inject the requested bias.

    ``transform`` is applied to each decoded image (default: timm's transform for the split, for file
    datasets; a float tensor in [0, 1] for in-memory ones). ``strict`` turns an unreadable image into an
    error instead of a skip. ``download`` lets CIFAR be fetched by torchvision when missing.
    ``eta_options`` go to :func:`cmw_transfer.bias.estimate_eta` for PMD steps. A file dataset whose lists
    leave a class without samples is refused unless ``allow_empty_classes`` (then see
    :func:`cmw_transfer.dataset.classes.nonempty_classes`).
    """
    base, bias = resolve_source(name, noise, imbalance)
    kwargs: dict[str, Any] = {"transform": transform}
    if base in ("cifar10", "cifar100"):
        kwargs["download"] = download
    elif base != "digits":
        kwargs["allow_empty_classes"] = allow_empty_classes
    ds = _loader(base)(root, split, **kwargs)
    if hasattr(ds, "strict"):
        ds.strict = strict
    if bias.is_empty:
        return ds
    from cmw_transfer.bias.apply import apply_bias

    return apply_bias(ds, bias, seed=seed, eta_options=eta_options)

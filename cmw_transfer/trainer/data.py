"""What the stages train and evaluate on: the apply stage's target splits, the meta-train stage's source.

A ``list:`` / ``folder:`` dataset has no test split of its own: both stages require an explicit evaluation set
for it (``--eval-dataset``) rather than evaluating on the training files.

Lists that leave classes without samples are trained on, not refused: one warning names the empty classes; they
join no class-size family, no many/medium/few-shot split and no meta set, and an evaluation set's class without
samples has a per-class accuracy of null. Only a malformed list (bad or out-of-range label, unreadable) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cmw_transfer.bias.apply import apply_bias
from cmw_transfer.dataset import LabeledDataset, create_dataset, resolve_source, split_per_class
from cmw_transfer.dataset.classes import warn_empty_classes
from cmw_transfer.dataset.registry import check_source_exists
from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config import ApplyConfig, MetaSetSpec

WEBVISION = ("webvision-full", "mini-webvision")  # evaluated on WebVision val; ILSVRC12 val via extra_eval
FILE_SOURCES = ("list:", "folder:")
TRAIN_EMPTY = "training goes on without them (they join no class-size family and no shot split)"
EVAL_EMPTY = "their per-class accuracy is null"


def warn_empty(train: LabeledDataset, evals: list[tuple[str, LabeledDataset]], spec: str) -> None:
    """The one warning per set that leaves classes of the training set's 0..C-1 without samples."""
    warn_empty_classes(train.class_counts(), spec, TRAIN_EMPTY)
    for label, ds in evals:
        warn_empty_classes(np.bincount(ds.targets, minlength=train.num_classes), f"evaluation set '{label}'",
                           EVAL_EMPTY)


def _train_transform(ds: Any, img_size: int | None) -> Any:
    """Standard augmentation for CIFAR-size in-memory sets; None keeps the dataset's own default."""
    shape = getattr(ds, "input_shape", None)
    if shape is None or img_size is not None or shape[1] < 32:
        return None
    from torchvision import transforms

    return transforms.Compose([transforms.RandomCrop(shape[1], padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor()])


def _make(name: str, root: str | None, split: str, *, seed: int, strict: bool, **kwargs: Any) -> Any:
    try:
        return create_dataset(name, root, split, seed=seed, strict=strict, allow_empty_classes=True, **kwargs)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(f"--data-dir: {exc}; download the data or point --data-dir at it") from None


def load_train(dataset: str, root: str | None, noise: str | None, imbalance: float | None, *, seed: int,
               strict: bool = False, img_size: int | None = None) -> Any:
    """A target's training split with the requested bias and its augmentation (apply's layout, the probe's)."""
    transform = None
    if img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        transform = make_transform("train", img_size)
    train = _make(dataset, root, "train", seed=seed, strict=strict, transform=transform, noise=noise,
                  imbalance=imbalance)
    if transform is None:
        aug = _train_transform(train, img_size)
        if aug is not None:  # the untransformed eval tensor equals ToTensor of this augmentation's output
            train.transform = aug
    return train


def load_datasets(cfg: ApplyConfig) -> tuple[Any, list[tuple[str, Any]]]:
    """Train split with the requested bias; the clean evaluation splits (test / WebVision val, ``extra_eval``)."""
    def make(name: str, root: str | None, split: str, **kwargs: Any) -> Any:
        return _make(name, root, split, seed=cfg.seed, strict=cfg.strict, **kwargs)

    train = load_train(cfg.dataset, cfg.data_root, cfg.noise, cfg.imbalance, seed=cfg.seed, strict=cfg.strict,
                       img_size=cfg.img_size)
    eval_tf = None
    if cfg.img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        eval_tf = make_transform("val", cfg.img_size)
    base, _ = resolve_source(cfg.dataset)  # a preset's noise never reaches the evaluation split
    if cfg.eval_dataset:
        test = make(cfg.eval_dataset, None, "test", transform=eval_tf)
    elif base.startswith(FILE_SOURCES):
        raise UserError(f"--dataset {cfg.dataset} has no built-in test split: add --eval-dataset list:VAL.txt or "
                        "--eval-dataset folder:VAL_DIR")
    else:
        test = make(base, cfg.data_root, "val" if base in WEBVISION else "test", transform=eval_tf)
    evals = [("test", test)]
    for item in cfg.extra_eval:
        label, _, spec = item.partition("=")
        if not spec or not label.isidentifier():
            raise UserError(f"--extra-eval '{item}': expected NAME=SPEC, e.g. ilsvrc12=list:/data/imagenet/val.txt")
        extra = make(spec, None, "val", transform=eval_tf)
        evals.append((label, extra))
    for label, ds in evals:
        if ds.num_classes > train.num_classes:
            raise UserError(f"evaluation set '{label}' has {ds.num_classes} classes but the training set has "
                            f"{train.num_classes}; its labels must use the training set's class indices")
    warn_empty(train, evals, f"--dataset {cfg.dataset}")
    return train, evals


def check_model_name(name: str) -> None:
    import timm

    from cmw_transfer.models import create_model, list_builtin_models

    if name.replace("-", "_") not in list_builtin_models() and not timm.is_model(name):
        create_model(name, num_classes=2)  # raises the UserError with near matches



# -- the meta-train source ----------------------------------------------------------------------------------------
def check_class_sizes(counts: np.ndarray, per_class: int, what: str) -> None:
    """Refuse a meta set that would take a class's every sample; classes without samples have no part in it."""
    small = np.flatnonzero(counts <= per_class) if what == "clean" else np.flatnonzero(counts < per_class)
    small = small[counts[small] > 0]
    if small.size:
        need = "more than" if what == "clean" else "at least"
        raise UserError(f"--meta-set {what}:{per_class} needs {need} {per_class} samples in every class, but "
                        f"class(es) {small[:10].tolist()} have {counts[small[:10]].tolist()}; lower N")


@dataclass
class SourceData:
    train: LabeledDataset
    test: LabeledDataset | None
    clean_meta: LabeledDataset | None


def load_source(src: str, data_dir: str | None, noise: str | None, imbalance: float | None, *, seed: int,
                meta: MetaSetSpec, eval_dataset: str | None = None) -> SourceData:
    """The meta-train layout: clean meta samples held out first (``meta`` clean:N), then the bias, and the test set
    (``eval_dataset``, else the base dataset's own, if it has one)."""
    base, bias = resolve_source(src, noise, imbalance)
    check_source_exists(base)  # a missing list file is "not found", not "has no test split"
    if base.startswith(FILE_SOURCES) and not eval_dataset:
        raise UserError(f"--src {src} has no built-in test split (metatrain would evaluate on its own training "
                        "files): add --eval-dataset list:VAL.txt or --eval-dataset folder:VAL_DIR")
    clean = create_dataset(base, data_dir, "train", allow_empty_classes=True)
    clean_meta = None
    if meta.kind == "clean":
        check_class_sizes(clean.class_counts(), meta.per_class, "clean")
        clean, clean_meta = split_per_class(clean, meta.per_class, seed=seed)
    train = clean if bias.is_empty else apply_bias(clean, bias, seed=seed)
    if meta.kind == "lowest-loss":
        check_class_sizes(train.class_counts(), meta.per_class, "lowest-loss")
    if eval_dataset:
        test = create_dataset(eval_dataset, None, "test", allow_empty_classes=True)
        if test.num_classes > train.num_classes:
            raise UserError(f"--eval-dataset has {test.num_classes} classes but the source has {train.num_classes}; "
                            "its labels must use the source's class indices")
    else:
        try:
            test = create_dataset(base, data_dir, "test", allow_empty_classes=True)
        except UserError:
            test = None
    warn_empty(train, [("test", test)] if test is not None else [], f"--src {src}")
    return SourceData(train, test, clean_meta)

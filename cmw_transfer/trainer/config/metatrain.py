"""The meta-train stages' configuration (``metatrain``, ``advisor``, ``curvenet``), their recipes and the parsers
of their string options (torch-free, so ``--help`` and ``validate()`` need no torch)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from cmw_transfer.defaults import CURVENET_MODES
from cmw_transfer.errors import UserError
from cmw_transfer.parsing import parse_name_list
from cmw_transfer.trainer.config.base import RUN_OPTIONS, StageConfig, config_fingerprint

METHODS = ("cmwnet", "mwnet", "cmwnet-sl", "advisor")
# what --method advisor reads: in the fingerprint of advisor runs only, so other runs keep theirs
ADVISOR_FIELDS = ("advisor", "advisor_rho")
ADVISOR_PARTS = ("mfrw", "mes")
# per-method defaults, between the source's recipe and --config/the command line (the advisor paper: Adam 1e-4,
# actual step with the updated advisor)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "advisor": dict(meta_lr=1e-4, meta_weight_decay=0.0, actual_step="updated"),
}
# reuse: the real step uses the gradient the virtual step already computed (weights of the net before its update):
#        one backward fewer and the training graph is freed before the meta pass (peak memory ~ one step).
# updated: the paper's order, the real step re-weights with the just-updated net (keeps the graph alive).
ACTUAL_STEPS = ("reuse", "updated")
# meta-train settings a resume may change (epochs is checked on its own, with its own message)
METATRAIN_RESUME_FREE = ("epochs", "device", "workers", "out", "eval_dataset", "log", *RUN_OPTIONS)


# -- the string options ---------------------------------------------------------------------------------------------
def parse_meta_grad(spec: str) -> tuple[str, int]:
    """``exact`` -> ("exact", 0); ``skip:N`` -> ("skip", N); ``famus`` -> ("famus", 0)."""
    if spec in ("exact", "famus"):
        return spec, 0
    if spec.startswith("skip:") and re.fullmatch("[0-9]{1,4}", spec[5:]):  # ASCII digits: int() reads any script's
        return "skip", int(spec[5:])
    raise ValueError(f"--meta-grad must be exact, skip:N or famus (N: digits 0-9), got {spec!r}")


@dataclass(frozen=True)
class MetaSetSpec:
    kind: str  # "clean" | "lowest-loss" | "gmm"
    per_class: int = 0

    @property
    def rebuilt_each_epoch(self) -> bool:
        return self.kind != "clean"


def parse_meta_set(text: str) -> MetaSetSpec:
    kind, sep, count = str(text).partition(":")
    if kind == "gmm" and not sep:
        return MetaSetSpec("gmm")
    if kind in ("clean", "lowest-loss") and re.fullmatch("[0-9]{1,9}", count) and int(count) > 0:  # ASCII digits
        return MetaSetSpec(kind, int(count))
    raise UserError(f"--meta-set must be clean:N, lowest-loss:N or gmm (N > 0, digits 0-9), got {text!r}")


def parse_advisor(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"mfrw,mes"`` -> ("mfrw", "mes"); at least one part, each once, no unknown or empty one
    (:func:`cmw_transfer.parsing.parse_name_list`)."""
    parts = parse_name_list(spec, "--advisor", choices=ADVISOR_PARTS)
    return tuple(p for p in ADVISOR_PARTS if p in parts)


# -- metatrain ------------------------------------------------------------------------------------------------------
@dataclass
class MetaTrainConfig(StageConfig):
    """A meta-train run (cmwnet / mwnet / cmwnet-sl / advisor); stored as ``run.json`` beside the exported net."""

    stage: ClassVar[str] = "metatrain"
    unrecorded: ClassVar[tuple[str, ...]] = RUN_OPTIONS  # run.json records what was computed

    src: str = "digits-pmd"
    out: str = "runs/metatrain"
    data_dir: str | None = None
    noise: str | None = None
    imbalance: float | None = None
    method: str = "cmwnet"
    families: int = 3
    model: str = "small_cnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    meta_interval: int = 1
    meta_batch_size: int = 100
    meta_set: str = "clean:10"
    meta_grad: str = "exact"
    normalization: str = "batch"
    mirror_optimizer: bool = False
    actual_step: str = "reuse"
    warmup_epochs: int = 5
    hidden_size: int = 100
    ema_decay: float = 0.99
    mixup_alpha: float = 0.0
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    famus_active: int = 4
    eval_dataset: str | None = None  # required for list: / folder: sources (they have no test split)
    advisor: str = "mfrw,mes"  # --method advisor: which outputs the advisor has (mfrw, mes or both)
    advisor_rho: float = 0.9  # --method advisor: P(beta = 1) of the MES Bernoulli
    log: tuple[str, ...] = ()  # --log csv,tensorboard: loggers beside metrics.jsonl (not in the fingerprint)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def bookkeeping_keys(cls) -> tuple[str, ...]:
        return (*super().bookkeeping_keys(), "class_counts", "centers", "family_of_class")

    def trainer_name(self) -> str:
        return "advisor" if self.method == "advisor" else "metatrain"

    def fingerprint(self) -> str:
        config = self.to_dict()
        if config["eval_dataset"] is None:  # the fingerprint of runs from before the option existed
            config.pop("eval_dataset")
        if self.method != "advisor":
            for key in ADVISOR_FIELDS:
                config.pop(key)
        return config_fingerprint(config, ignore=METATRAIN_RESUME_FREE)

    def validate(self) -> None:
        self.check_common()
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.meta_interval < 1:
            raise UserError(f"--meta-interval must be >= 1 (a meta step every k iterations), got {self.meta_interval}")
        for name in ("epochs", "batch_size", "meta_batch_size", "families", "hidden_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.lr <= 0 or self.meta_lr <= 0:
            raise UserError("--lr and --meta-lr must be > 0")
        try:
            parse_meta_grad(self.meta_grad)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        parse_meta_set(self.meta_set)
        if self.actual_step not in ACTUAL_STEPS:
            raise UserError(f"--actual-step must be one of {', '.join(ACTUAL_STEPS)}, got '{self.actual_step}'")
        if self.method == "mwnet":
            self.families = 1
        if self.method == "advisor":
            parse_advisor(self.advisor)
            if not 0.0 <= self.advisor_rho <= 1.0:
                raise UserError(f"--advisor-rho must be in [0, 1], got {self.advisor_rho}")


# Paper recipes (reference-implementations.md §1.2) and the embedded demo; used for options left unset.
RECIPES: dict[str, dict[str, Any]] = {
    "cifar10-pmd": dict(method="cmwnet-sl", model="cifar_resnet32", epochs=120, batch_size=128, lr=0.1,
                        momentum=0.9, weight_decay=1e-3, sched="cosine", meta_lr=1e-3, meta_weight_decay=1e-4,
                        meta_interval=10, meta_batch_size=100, meta_set="lowest-loss:10", warmup_epochs=45,
                        ema_decay=0.999, mixup_alpha=4.0, normalization="batch"),
    "digits-pmd": dict(method="cmwnet", model="small_cnn", epochs=30, batch_size=64, lr=0.05, meta_lr=1e-3,
                       meta_interval=1, meta_batch_size=100, meta_set="clean:10", warmup_epochs=5),
    "fashion-mnist-pmd": dict(method="cmwnet", model="lenet", epochs=15, batch_size=128, lr=0.05, meta_lr=1e-3,
                              meta_interval=5, meta_batch_size=100, meta_set="clean:100", warmup_epochs=3),
}


# a plain dataset name takes the recipe of its preset (``--src fashion-mnist --noise sym:0.4``: LeNet, 15 epochs)
DATASET_RECIPES = {"fashion-mnist": "fashion-mnist-pmd", "mnist": "fashion-mnist-pmd", "kmnist": "fashion-mnist-pmd"}


def recipe_for(src: str) -> dict[str, Any]:
    return dict(RECIPES.get(src, RECIPES.get(DATASET_RECIPES.get(src, ""), {})))


# -- curvenet: the allocate stage -----------------------------------------------------------------------------------
# the paper's allocating stage (CIFAR): multistep lr x0.1 at epochs 80 and 100 of 200, meta-learning from the
# start, CurveNet by Adam at 1e-3; used for options left unset
CURVENET_RECIPE: dict[str, Any] = dict(sched="multistep", warmup_epochs=0, meta_lr=1e-3, meta_weight_decay=1e-4)
DECAY_FRACTIONS = (0.4, 0.5)


@dataclass
class CurveNetConfig(MetaTrainConfig):
    """``metatrain --method curvenet``: the meta-train settings plus the curves and the CurveNet's own."""

    stage: ClassVar[str] = "metatrain"

    method: str = "curvenet"
    curves: str | None = None
    curvenet_mode: str = "faithful"
    curve_skip: int = 5  # S: the first S probe epochs are dropped (paper: 5)
    curve_length: int = 32  # transferable mode: the curve resampled to this many points
    embed_dim: int = 64  # P
    curvenet_factor: float = 1.0  # w = factor * sigmoid + bias (paper, CIFAR-10)
    curvenet_bias: float = 0.02
    meta_stop_epoch: int | None = None  # meta updates in epochs 1..N; None: up to the first lr decay (80 of 200)

    def trainer_name(self) -> str:
        return "curvenet"

    def validate(self) -> None:
        if self.method != "curvenet":
            raise UserError(f"CurveNetConfig is for --method curvenet, got '{self.method}'")
        MetaTrainConfig.validate(dataclasses.replace(self, method="cmwnet"))
        if not self.curves:
            raise UserError("--method curvenet needs --curves DIR: record the curves first with cmw-transfer probe "
                            f"--dataset {self.src} --meta-set {self.meta_set} --seed {self.seed} --out DIR")
        if self.curvenet_mode not in CURVENET_MODES:
            raise UserError(f"--curvenet-mode must be one of {', '.join(CURVENET_MODES)}, got "
                            f"'{self.curvenet_mode}'")
        if self.curve_skip < 0 or self.curve_length < 2 or self.embed_dim < 1:
            raise UserError("--curve-skip must be >= 0, --curve-length >= 2 and --embed-dim >= 1")
        if not self.curvenet_factor > 0:
            raise UserError(f"--curvenet-factor must be > 0, got {self.curvenet_factor}")
        if self.meta_stop_epoch is not None and not 0 <= self.meta_stop_epoch <= self.epochs:
            raise UserError(f"--meta-stop-epoch must be in 0..{self.epochs}, got {self.meta_stop_epoch}")

    def decay_milestones(self) -> list[int]:
        return [max(1, int(f * self.epochs)) for f in DECAY_FRACTIONS]

    def stop_epoch(self) -> int:
        return self.meta_stop_epoch if self.meta_stop_epoch is not None else self.decay_milestones()[0]

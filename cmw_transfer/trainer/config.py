"""One configuration dataclass per stage: built from the CLI (or ``--config FILE``), validated here, saved as is.

Every stage's config is a :class:`StageConfig`: ``to_dict()`` is what ``config.json`` / ``run.json`` hold and
``from_dict`` / ``from_file`` read it back (unknown keys are refused, so a typo in a config file is an error, not
a silently ignored option). ``validate()`` holds every check that needs no data: it runs before anything is
loaded or written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cmw_transfer.errors import UserError
from cmw_transfer.parsing import check_int_sequence, parse_name_list, parse_named_specs
from cmw_transfer.trainer.defaults import MIXUP_ALPHA, TEACHER_DECAY
from cmw_transfer.untrusted import loads

# torch-free on purpose: the CLI builds its option tables from this module, so `--help` never imports torch.
NORMALIZATIONS = ("batch", "sum", "none")


def config_fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Hash of the settings that must match for a resume to continue the same run."""
    kept = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]

C = TypeVar("C", bound="StageConfig")

# --log: epoch loggers beside metrics.jsonl (cmw_transfer.metrics.loggers); the engine runs them for every stage
LOGGERS = ("csv", "tensorboard")
TENSORBOARD_HINT = "pip install 'cmw-transfer[tensorboard]'"


def parse_loggers(value: Any) -> tuple[str, ...]:
    """``"tensorboard,csv"`` (or a list of names) -> ``("csv", "tensorboard")``; None or an empty list: no logger.
    An unknown, empty or repeated name (``""``, ``"csv,"``) is a UserError (:mod:`cmw_transfer.parsing`)."""
    if value is None or (not isinstance(value, str) and not list(value)):
        return ()
    return parse_name_list(value, "--log", choices=LOGGERS)


def check_loggers(log: Any) -> tuple[str, ...]:
    """Validate ``--log`` and, for TensorBoard, that its package is installed (before any work)."""
    names = parse_loggers(log)
    if "tensorboard" in names:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise UserError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_HINT}")
    return names

WEIGHTINGS = ("cmw", "none", "focal", "class-balanced", "eql")  # fixed baselines: cmw_transfer.baselines, .eql
EQL_FIELDS = ("eql_threshold", "eql_rho")  # --weighting eql only: in the fingerprint of EQL runs only
TRAINERS = ("erm", "oltr")
OLTR_SAMPLERS = ("class-aware", "uniform")
# options only --trainer oltr reads: they enter the fingerprint of OLTR runs only, so ERM runs keep theirs
OLTR_FIELDS = ("oltr_stage1_epochs", "oltr_stage2_epochs", "oltr_backbone_lr_mult", "oltr_sampler",
               "samples_per_class", "dcl_weight", "dcl_margin", "dcl_push_weight", "cosine_scale",
               "reachability_scale", "modulated_attention", "recompute_centroids")
# settings that do not change what is computed: a resume may change them
RESUME_FREE = ("out", "resume", "workers", "eval_every", "extra_eval", "device", "overwrite", "progress",
               "open_dataset", "open_threshold", "open_accept", "log")
METHODS = ("cmwnet", "mwnet", "cmwnet-sl", "advisor")
# what --method advisor reads: in the fingerprint of advisor runs only, so other runs keep theirs
ADVISOR_FIELDS = ("advisor", "advisor_rho")
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
METATRAIN_RESUME_FREE = ("epochs", "device", "workers", "out", "eval_dataset", "log")


class StageConfig:
    """Shared behaviour of the stage configs (dataclasses): dict / file round trip and finite-float checks."""

    stage: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Build from a dict such as a saved ``config.json``; bookkeeping keys (fingerprint, ...) are ignored."""
        if not isinstance(values, dict):
            raise UserError(f"a {cls.stage} configuration must be a JSON/YAML object, got {type(values).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(k for k in values if k not in names and k not in cls.bookkeeping_keys())
        if unknown:
            raise UserError(f"unknown {cls.stage} setting(s) {', '.join(unknown)}; see --help for the options")
        kept = {k: v for k, v in values.items() if k in names}
        for key, value in kept.items():  # JSON has no tuples
            if isinstance(value, list) and isinstance(names[key].default, tuple):
                kept[key] = tuple(value)
        try:
            return cls(**kept)
        except TypeError as exc:
            raise UserError(f"{cls.stage} configuration: {exc}") from None

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a JSON file, or YAML when PyYAML is installed and the name ends in .yaml / .yml."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--config {path}: cannot read it ({exc})") from None
        return cls.from_dict(load_config_text(text, path))

    @classmethod
    def bookkeeping_keys(cls) -> tuple[str, ...]:
        return ("fingerprint", "world_size", "stage", "labels_digest")

    def check_finite(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def load_config_text(text: str, path: Path) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or write JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except RecursionError:  # PyYAML's composer recurses: a 30,000-deep nest
            raise UserError(f"--config {path}: not valid YAML (nested too deep)") from None
    try:
        return loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--config {path}: not valid JSON ({exc})") from None


def _at_least(pairs: tuple[tuple[str, Any, int], ...]) -> None:
    for name, value, low in pairs:
        if value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")


# -- apply (erm / oltr) -------------------------------------------------------------------------------------------
@dataclass
class ApplyConfig(StageConfig):
    """Everything that defines an apply run; stored as ``config.json`` and fingerprinted for ``--resume``."""

    stage: ClassVar[str] = "apply"

    dataset: str
    out: str
    weights: str | None = None
    data_root: str | None = None
    noise: str | None = None
    imbalance: float | None = None
    model: str = "resnet18"
    img_size: int | None = None
    pretrained: bool = False
    initial_checkpoint: str | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    decay_milestones: tuple[int, ...] = ()  # multistep: epochs where lr x0.1 (default 50% and 75% of the run)
    warmup_lr_epochs: int = 0
    warmup_epochs: int | str = "auto"  # plain-CE epochs, or auto (cmw_transfer.guards.WarmupGate)
    min_class_weight: float = 0.5
    weighting: str = "cmw"
    focal_gamma: float = 2.0
    cb_beta: float = 0.999
    eql_threshold: float | None = None  # --weighting eql: frequency threshold lambda (None: 1 / (2 C))
    eql_rho: float = 0.9  # --weighting eql: P(beta = 1)
    normalization: str = "batch"
    families: int | None = None
    soft_labels: bool = False
    mixup_alpha: float = MIXUP_ALPHA
    teacher_decay: float = TEACHER_DECAY
    amp: bool = False
    workers: int = 4
    seed: int = 0
    strict: bool = False
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 1
    eval_dataset: str | None = None
    extra_eval: tuple[str, ...] = ()
    device: str = "auto"
    progress: bool = True
    # --trainer oltr (docs/oltr.md); defaults are the official OLTR configuration's
    trainer: str = "erm"
    oltr_stage1_epochs: int | None = None  # None: --epochs
    oltr_stage2_epochs: int | None = None  # None: --epochs
    oltr_backbone_lr_mult: float = 0.1
    oltr_sampler: str = "class-aware"
    samples_per_class: int = 4
    dcl_weight: float = 0.01
    dcl_margin: float = 10.0
    dcl_push_weight: float = 0.01
    cosine_scale: float = 16.0
    reachability_scale: float = 10.0
    modulated_attention: bool | None = None  # None: on for CNN (channel-first 4-D) feature maps
    recompute_centroids: bool = False
    # open-set evaluation (both trainers)
    open_dataset: str | None = None
    open_classes: tuple[int, ...] = ()
    open_threshold: float | None = None  # None: the reachability accepting --open-accept of the known test set
    open_accept: float = 0.95
    # a CurveNet --weights reads each sample's loss curve from this probe directory (docs/curvenet.md)
    curves: str | None = None
    log: tuple[str, ...] = ()  # --log csv,tensorboard: loggers beside metrics.jsonl (not in the fingerprint)

    def fingerprint(self) -> str:
        config = self.to_dict()
        if config["curves"] is None:  # the fingerprint of runs from before the option existed
            config.pop("curves")
        if self.trainer == "erm":  # an ERM run's fingerprint is the one it had before OLTR existed
            for key in (*OLTR_FIELDS, "trainer"):
                config.pop(key)
        if not self.open_classes:
            config.pop("open_classes")
        if self.weighting != "eql":
            for key in EQL_FIELDS:
                config.pop(key)
        return config_fingerprint(config, ignore=RESUME_FREE)

    def stage_epochs(self) -> tuple[int, int]:
        """OLTR's (stage 1, stage 2) epochs; ERM trains one stage of ``epochs``."""
        if self.trainer != "oltr":
            return self.epochs, 0
        return (self.oltr_stage1_epochs if self.oltr_stage1_epochs is not None else self.epochs,
                self.oltr_stage2_epochs if self.oltr_stage2_epochs is not None else self.epochs)

    def total_epochs(self) -> int:
        return sum(self.stage_epochs())

    def validate(self) -> None:
        """Cheap checks, before anything is loaded or written."""
        self.check_finite()
        self.log = check_loggers(self.log)
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got '{self.weighting}'")
        if self.weighting == "cmw" and not self.weights:
            raise UserError("--weighting cmw needs --weights SPEC (or use --weighting none for the ERM baseline)")
        if self.weighting == "eql" and (not 0.0 <= self.eql_rho <= 1.0 or (self.eql_threshold or 0.0) < 0):
            raise UserError("--eql-rho must be in [0, 1] and --eql-threshold >= 0")
        if self.weighting == "eql" and self.soft_labels:
            raise UserError("--weighting eql changes the softmax of the plain loss; it does not combine with "
                            "--soft-labels")
        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}")
        _at_least((("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
                   ("eval-every", self.eval_every, 1), ("warmup-lr-epochs", self.warmup_lr_epochs, 0),
                   ("workers", self.workers, 0)))
        if self.warmup_epochs != "auto" and not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            raise UserError(f"--warmup-epochs must be auto or a number >= 0, got {self.warmup_epochs!r}")
        if not 0.0 <= self.min_class_weight <= 1.0:
            raise UserError(f"--min-class-weight must be in [0, 1], got {self.min_class_weight}")
        if self.families is not None and self.families < 1:
            raise UserError(f"--families must be >= 1, got {self.families}")
        if not 0.0 <= self.teacher_decay < 1.0:
            raise UserError(f"--teacher-decay must be in [0, 1), got {self.teacher_decay}")
        if self.mixup_alpha < 0:
            raise UserError(f"--mixup-alpha must be >= 0, got {self.mixup_alpha}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        if self.trainer not in TRAINERS:
            raise UserError(f"--trainer must be one of {', '.join(TRAINERS)}, got '{self.trainer}'")
        if self.open_threshold is not None and not self.open_threshold > 0:
            raise UserError(f"--open-threshold must be > 0 (a reachability), got {self.open_threshold}")
        if not 0.0 < self.open_accept <= 1.0:
            raise UserError(f"--open-accept must be in (0, 1], got {self.open_accept}")
        self._validate_lists()
        if self.open_dataset and self.open_classes:
            raise UserError("--open-dataset and --open-classes both define the open set; pick one")
        if self.trainer == "oltr":
            self._validate_oltr()

    def _validate_lists(self) -> None:
        """The list options (also from a config file): increasing, no repeats, inside the run."""
        check_int_sequence(self.open_classes, "--open-classes", low=0, ascending=True)
        check_int_sequence(self.decay_milestones, "--decay-milestones", low=1, high=max(self.stage_epochs()),
                           ascending=True, high_note="the last epoch of a stage: a later one never takes effect")
        if self.decay_milestones and self.sched != "multistep":
            raise UserError(f"--decay-milestones only apply to --sched multistep (this run uses {self.sched})")
        self.extra_eval = parse_named_specs(self.extra_eval, "--extra-eval", "ilsvrc12=list:/data/imagenet/val.txt")

    def _validate_oltr(self) -> None:
        if self.soft_labels:
            raise UserError("--soft-labels is a form of the ERM trainer; drop it or use --trainer erm")
        if self.oltr_sampler not in OLTR_SAMPLERS:
            raise UserError(f"--oltr-sampler must be one of {', '.join(OLTR_SAMPLERS)}, got '{self.oltr_sampler}'")
        stage1, stage2 = self.stage_epochs()
        _at_least((("oltr-stage1-epochs", stage1, 1), ("oltr-stage2-epochs", stage2, 1),
                   ("samples-per-class", self.samples_per_class, 1)))
        for name, value in (("oltr-backbone-lr-mult", self.oltr_backbone_lr_mult), ("dcl-weight", self.dcl_weight),
                            ("dcl-margin", self.dcl_margin), ("dcl-push-weight", self.dcl_push_weight)):
            if not value >= 0:
                raise UserError(f"--{name} must be >= 0, got {value}")
        for name, value in (("cosine-scale", self.cosine_scale), ("reachability-scale", self.reachability_scale)):
            if not value > 0:
                raise UserError(f"--{name} must be > 0, got {value}")


# -- metatrain ----------------------------------------------------------------------------------------------------
@dataclass
class MetaTrainConfig(StageConfig):
    """A meta-train run (cmwnet / mwnet / cmwnet-sl); stored as ``run.json`` beside the exported net."""

    stage: ClassVar[str] = "metatrain"

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

    @classmethod
    def bookkeeping_keys(cls) -> tuple[str, ...]:
        return (*super().bookkeeping_keys(), "class_counts", "centers", "family_of_class")

    def fingerprint(self) -> str:
        config = self.to_dict()
        if config["eval_dataset"] is None:  # the fingerprint of runs from before the option existed
            config.pop("eval_dataset")
        if self.method != "advisor":
            for key in ADVISOR_FIELDS:
                config.pop(key)
        return config_fingerprint(config, ignore=METATRAIN_RESUME_FREE)

    def validate(self) -> None:
        self.check_finite()
        self.log = check_loggers(self.log)
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
            from cmw_transfer.trainer.metastep import parse_meta_grad

            parse_meta_grad(self.meta_grad)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        from cmw_transfer.trainer.metasets import parse_meta_set

        parse_meta_set(self.meta_set)
        if self.actual_step not in ACTUAL_STEPS:
            raise UserError(f"--actual-step must be one of {', '.join(ACTUAL_STEPS)}, got '{self.actual_step}'")
        if self.method == "mwnet":
            self.families = 1
        if self.method == "advisor":
            from cmw_transfer.trainer.advisor import parse_advisor

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


# apply's defaults for options left unset, per target dataset (presets use their base dataset's): 28x28 grey
# images get the LeNet-style CNN, which trains an epoch of 60,000 images in seconds on a CPU, and a shorter run
APPLY_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(model="lenet", epochs=15, lr=0.05) for name in ("fashion-mnist", "mnist", "kmnist")}


def apply_defaults_for(dataset: str) -> dict[str, Any]:
    from cmw_transfer.dataset.registry import PRESETS

    spec = str(dataset).strip()
    return dict(APPLY_DATASET_DEFAULTS.get(PRESETS.get(spec, (spec,))[0], {}))

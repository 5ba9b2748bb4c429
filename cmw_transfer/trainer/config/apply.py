"""The apply stages' configuration (``erm`` / ``oltr``): ``config.json`` of an apply run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from cmw_transfer.defaults import MIXUP_ALPHA, NORMALIZATIONS, TEACHER_DECAY
from cmw_transfer.errors import UserError
from cmw_transfer.parsing import check_int_sequence, parse_int_list, parse_named_specs
from cmw_transfer.trainer.config.base import StageConfig, at_least, config_fingerprint

WEIGHTINGS = ("cmw", "none", "focal", "class-balanced", "eql")  # fixed baselines: cmw_transfer.weighting
EQL_FIELDS = ("eql_threshold", "eql_rho")  # --weighting eql only: in the fingerprint of EQL runs only
TRAINERS = ("erm", "oltr")
TRUST_CHECKS = ("fallback", "warn", "off")
OLTR_SAMPLERS = ("class-aware", "uniform")
# options only --trainer oltr reads: they enter the fingerprint of OLTR runs only, so ERM runs keep theirs
OLTR_FIELDS = ("oltr_stage1_epochs", "oltr_stage2_epochs", "oltr_backbone_lr_mult", "oltr_sampler",
               "samples_per_class", "dcl_weight", "dcl_margin", "dcl_push_weight", "cosine_scale",
               "reachability_scale", "modulated_attention", "recompute_centroids")
# settings that do not change what is computed: a resume may change them
RESUME_FREE = ("out", "resume", "workers", "eval_every", "extra_eval", "device", "overwrite", "progress",
               "open_dataset", "open_threshold", "open_accept", "log")


def parse_open_classes(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"9"`` or ``"7,8,9"`` -> ``(7, 8, 9)``; the CLI form of ``--open-classes``, parsed strictly (increasing,
    each class once: :func:`cmw_transfer.parsing.parse_int_list`). None or an empty sequence: no open classes."""
    if text is None or (not isinstance(text, str) and not list(text)):
        return ()
    return parse_int_list(text, "--open-classes", example="9 or 7,8,9", noun="class indices", low=0,
                          ascending=True)


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
    warmup_epochs: int | str = "auto"  # plain-CE epochs, or auto (cmw_transfer.weighting.guards.WarmupGate)
    min_class_weight: float = 0.5
    weighting: str = "cmw"
    focal_gamma: float = 2.0
    cb_beta: float = 0.999
    eql_threshold: float | None = None  # --weighting eql: frequency threshold lambda (None: 1 / (2 C))
    eql_rho: float = 0.9  # --weighting eql: P(beta = 1)
    normalization: str = "auto"  # auto: sum for a frozen net (--weighting cmw), batch for the fixed baselines
    trust_check: str = "fallback"  # fallback | warn | off: weighting.guards.trust_verdict at the warm-up's end
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

    def __post_init__(self) -> None:
        if self.normalization == "auto":  # stored resolved: config.json says what the run did
            self.normalization = "sum" if self.weighting == "cmw" else "batch"

    def fingerprint(self) -> str:
        config = self.to_dict()
        if config["curves"] is None:  # the fingerprint of runs from before the option existed
            config.pop("curves")
        if self.trainer == "erm":  # an ERM run's fingerprint is the one it had before OLTR existed
            for key in (*OLTR_FIELDS, "trainer"):
                config.pop(key)
        if not self.open_classes:
            config.pop("open_classes")
        if self.trust_check == "fallback":  # the fingerprint of runs from before the option existed
            config.pop("trust_check")
        if self.weighting != "eql":
            for key in EQL_FIELDS:
                config.pop(key)
        return config_fingerprint(config, ignore=RESUME_FREE)

    def trainer_name(self) -> str:
        return self.trainer

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
        self.check_common()
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
            raise UserError(f"--normalization must be one of auto, {', '.join(NORMALIZATIONS)}")
        if self.trust_check not in TRUST_CHECKS:
            raise UserError(f"--trust-check must be one of {', '.join(TRUST_CHECKS)}, got {self.trust_check!r}")
        at_least((("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
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
        at_least((("oltr-stage1-epochs", stage1, 1), ("oltr-stage2-epochs", stage2, 1),
                  ("samples-per-class", self.samples_per_class, 1)))
        for name, value in (("oltr-backbone-lr-mult", self.oltr_backbone_lr_mult), ("dcl-weight", self.dcl_weight),
                            ("dcl-margin", self.dcl_margin), ("dcl-push-weight", self.dcl_push_weight)):
            if not value >= 0:
                raise UserError(f"--{name} must be >= 0, got {value}")
        for name, value in (("cosine-scale", self.cosine_scale), ("reachability-scale", self.reachability_scale)):
            if not value > 0:
                raise UserError(f"--{name} must be > 0, got {value}")


# apply's defaults for options left unset, per target dataset (presets use their base dataset's): 28x28 grey
# images get the LeNet-style CNN, which trains an epoch of 60,000 images in seconds on a CPU, and a shorter run
APPLY_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(model="lenet", epochs=15, lr=0.05) for name in ("fashion-mnist", "mnist", "kmnist")}


def apply_defaults_for(dataset: str) -> dict[str, Any]:
    from cmw_transfer.dataset.registry import PRESETS

    spec = str(dataset).strip()
    return dict(APPLY_DATASET_DEFAULTS.get(PRESETS.get(spec, (spec,))[0], {}))

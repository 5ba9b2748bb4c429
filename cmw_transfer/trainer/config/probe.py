"""The probe stage's configuration (CurveNet's first stage, ``cmw-transfer probe``) and its recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from cmw_transfer.defaults import SCHEDULE_KEYS
from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config.base import StageConfig, at_least, config_fingerprint
from cmw_transfer.trainer.config.metatrain import parse_meta_set

PROBE_RESUME_FREE = ("out", "workers", "device", "progress", "resume", "overwrite", "log")


@dataclass
class ProbeConfig(StageConfig):
    """A probe run. Defaults: the paper's CIFAR schedule in relative time, sized for the embedded digits."""

    stage: ClassVar[str] = "probe"

    dataset: str = "digits"
    out: str = "runs/probe"
    data_root: str | None = None
    noise: str | None = None
    imbalance: float | None = None
    # "clean:N": the meta-train layout (N clean samples per class held out before the bias, as
    # ``metatrain --meta-set clean:N``), so the curves index metatrain's training set; None: apply's layout
    meta_set: str | None = None
    model: str = "small_cnn"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    drop_fraction: float = 0.4  # paper: lr drop at epoch 120 of 300
    cycle_fraction: float = 0.05  # paper: the square wave toggles every 15 of 300 epochs
    cycle_high: float = 0.1  # x lr: paper 0.01 = 0.1 x 0.1
    cycle_low: float = 0.01  # x lr: paper 0.001
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    log: tuple[str, ...] = ()  # --log csv,tensorboard: loggers beside metrics.jsonl (not in the fingerprint)

    def trainer_name(self) -> str:
        return "probe"

    def fingerprint(self) -> str:
        return config_fingerprint(self.to_dict(), ignore=PROBE_RESUME_FREE)

    def validate(self) -> None:
        self.check_common()
        at_least((("epochs", self.epochs, 2), ("batch-size", self.batch_size, 1), ("workers", self.workers, 0)))
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise UserError(f"--drop-fraction must be in [0, 1), got {self.drop_fraction}")
        if not 0.0 < self.cycle_fraction <= 1.0:
            raise UserError(f"--cycle-fraction must be in (0, 1], got {self.cycle_fraction}")
        if not (self.cycle_high > 0 and self.cycle_low > 0):
            raise UserError("--cycle-high and --cycle-low must be > 0 (multiples of --lr)")
        if self.meta_set is not None and parse_meta_set(self.meta_set).kind != "clean":
            raise UserError(f"probe --meta-set must be clean:N (the meta-train layout), got '{self.meta_set}'; "
                            "other meta sets hold nothing out: leave it unset")

    def schedule(self) -> dict[str, Any]:
        """What defines the curves' meaning: the schedule in relative time, and the run length."""
        return {**{k: getattr(self, k) for k in SCHEDULE_KEYS}, "epochs": self.epochs}


# The paper's probing recipe on CIFAR (recognition_cycle.py) and the digits default; options left unset use these.
PROBE_RECIPES: dict[str, dict[str, Any]] = {
    "cifar10": dict(model="cifar_resnet32", epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4),
    "cifar100": dict(model="cifar_resnet32", epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4),
    "digits": dict(model="small_cnn", epochs=40, batch_size=64, lr=0.05),
}

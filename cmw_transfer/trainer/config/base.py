"""What every stage's configuration shares: the dict / file round trip, the fingerprint, the common checks.

Every stage's config is a :class:`StageConfig` dataclass: ``to_dict()`` is what ``config.json`` / ``run.json`` hold
and ``from_dict`` / ``from_file`` read it back (unknown keys are refused, so a typo in a config file is an error,
not a silently ignored option). ``validate()`` holds every check that needs no data: it runs before anything is
loaded or written. ``trainer_name()`` names the registered stage that runs it (``run_stage``).

Torch-free on purpose: the CLI builds its option tables from this package, so ``--help`` never imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cmw_transfer.defaults import LOGGERS, TENSORBOARD_HINT
from cmw_transfer.errors import UserError
from cmw_transfer.parsing import parse_name_list
from cmw_transfer.untrusted import loads

C = TypeVar("C", bound="StageConfig")

# how a run is started, not what it computes: never in a fingerprint
RUN_OPTIONS = ("resume", "overwrite", "progress")


def config_fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Hash of the settings that must match for a resume to continue the same run."""
    kept = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_loggers(value: Any) -> tuple[str, ...]:
    """``"tensorboard,csv"`` (or a list of names) -> ``("csv", "tensorboard")``; None or an empty list: no logger.
    An unknown, empty or repeated name (``""``, ``"csv,"``) is a UserError (:mod:`cmw_transfer.parsing`)."""
    if value is None or (not isinstance(value, str) and not list(value)):
        return ()
    return parse_name_list(value, "--log", choices=LOGGERS)


def check_loggers(log: Any) -> tuple[str, ...]:
    """Validate ``--log`` and, for TensorBoard, that its package is installed (before any work)."""
    names = parse_loggers(log)
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_HINT}")
    return names


def at_least(pairs: tuple[tuple[str, Any, int], ...]) -> None:
    for name, value, low in pairs:
        if value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")


class StageConfig:
    """Shared behaviour of the stage configs (dataclasses): dict / file round trip and the common checks.

    Every stage config has the fields ``out``, ``seed``, ``device``, ``log`` and the run options ``resume``,
    ``overwrite``, ``progress`` (how the run is started, never fingerprinted). ``unrecorded`` names fields that
    ``to_dict`` leaves out of the run's record.
    """

    stage: ClassVar[str] = ""
    unrecorded: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: v for k, v in values.items() if k not in self.unrecorded}

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

    def trainer_name(self) -> str:
        """The registered stage that runs this configuration."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def validate(self) -> None:
        raise NotImplementedError

    def check_finite(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")

    def check_common(self) -> None:
        """The checks every stage makes: finite numbers, ``--log``, ``--resume`` against ``--overwrite``."""
        self.check_finite()
        self.log = check_loggers(self.log)  # type: ignore[attr-defined]
        if self.resume and self.overwrite:  # type: ignore[attr-defined]
            raise UserError("--resume and --overwrite contradict each other; pick one")


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

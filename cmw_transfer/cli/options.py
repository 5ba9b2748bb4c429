"""Options shared by several subcommands, and the validated parameter types every numeric option uses.

Each type checks its value while click parses the command line, so a bad number is one ``error:`` line and
exit 2 before any data, model or worker process is started. Floats must be finite (and representable in
float32, the dtype they end up multiplying), ints must lie in a documented range; click prints the range in
``--help``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

FLOAT32_MAX = 3.4028234663852886e38
MAX_IMG_SIZE = 1024  # 3 x 1024^2 float32 = 12 MiB per image; larger inputs exhaust memory before a step runs
MAX_SEED = 2**63 - 1  # torch.manual_seed / np.random.SeedSequence accept it; seed + epoch still fits uint64
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 16
MAX_WORKERS = 256
MAX_FAMILIES = 100
MAX_HIDDEN = 1 << 16
MAX_NPROC = 1024
MAX_LR = 100.0


class FiniteFloat(click.FloatRange):
    """A finite float (no nan / inf, within +-float32 max) inside ``[min, max]``; ends may be open."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False,
                 max_open: bool = False) -> None:
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        number = super().convert(number, param, ctx)
        if abs(number) > FLOAT32_MAX:
            self.fail(f"{value!r} is too large (at most {FLOAT32_MAX:.3g} in magnitude).", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"FiniteFloat({self._describe_range()})"


def bounded_int(min: int | None = None, max: int | None = None) -> click.IntRange:
    """An int inside ``[min, max]`` (click's IntRange: the range shows in ``--help``)."""
    return click.IntRange(min=min, max=max)


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a CUDA/MPS request must be satisfiable here.

    torch accepts more device strings (``meta``, ``xla``, ...) on which training cannot run, so the set is
    closed rather than delegated to ``torch.device``.
    """

    name = "device"
    _PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,4})?)$")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not self._PATTERN.match(text):
            self.fail(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps.", param, ctx)
        if text.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                self.fail(f"{text}: CUDA is not available here; use cpu or auto.", param, ctx)
            index = int(text.split(":", 1)[1]) if ":" in text else 0
            if index >= torch.cuda.device_count():
                self.fail(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible.", param, ctx)
        elif text == "mps":
            import torch

            if not torch.backends.mps.is_available():
                self.fail("mps: MPS is not available here; use cpu or auto.", param, ctx)
        return text


class WarmupType(click.ParamType):
    """``auto`` or a number of plain-CE epochs (0..MAX_EPOCHS)."""

    name = "auto|E"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | int:
        if str(value).strip().lower() == "auto":
            return "auto"
        return bounded_int(0, MAX_EPOCHS).convert(value, param, ctx)


class LoggersType(click.ParamType):
    """``--log csv,tensorboard``: comma-separated logger names, checked here (the config re-checks files)."""

    name = "csv,tensorboard"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        from cmw_transfer.errors import UserError
        from cmw_transfer.trainer.config import parse_loggers

        if isinstance(value, tuple):
            return value
        try:
            return parse_loggers(str(value))
        except UserError as exc:
            self.fail(str(exc).removeprefix("--log: "), param, ctx)


LOG_HELP = ("Loggers beside metrics.jsonl, comma-separated: csv (metrics.csv, one row per epoch) and/or "
            "tensorboard (event files in OUT/tensorboard; pip install 'cmw-transfer[tensorboard]'). Under torchrun "
            "spell it --loggers (torchrun reads --log as its own --log-dir).")


def log_option(default: str | None) -> Callable[[Any], Any]:
    """``--log`` / ``--loggers``: the second spelling passes through torchrun, whose argument parser takes ``--log``
    for an ambiguous abbreviation of its ``--log-dir`` / ``--logs-specs`` (the ``--nproc`` relaunch uses it)."""
    return click.option("--log", "--loggers", "log", type=LOGGERS, default=default, help=LOG_HELP)


# -- the types the commands use ----------------------------------------------------------------------------------
LR = FiniteFloat(0.0, MAX_LR, min_open=True)
POSITIVE = FiniteFloat(0.0, min_open=True)
NON_NEGATIVE = FiniteFloat(0.0)
UNIT = FiniteFloat(0.0, 1.0)  # [0, 1]
UNIT_OPEN = FiniteFloat(0.0, 1.0, max_open=True)  # [0, 1): momentum, EMA decays, class-balanced beta
FRACTION = FiniteFloat(0.0, 1.0, min_open=True)  # (0, 1]
WEIGHT_DECAY = FiniteFloat(0.0, 1.0)
IMBALANCE = FiniteFloat(1.0)
SEED = bounded_int(0, MAX_SEED)
IMG_SIZE = bounded_int(1, MAX_IMG_SIZE)
EPOCHS = bounded_int(1, MAX_EPOCHS)
WARMUP = bounded_int(0, MAX_EPOCHS)
BATCH = bounded_int(1, MAX_BATCH)
WORKERS = bounded_int(0, MAX_WORKERS)
FAMILIES = bounded_int(1, MAX_FAMILIES)
HIDDEN = bounded_int(1, MAX_HIDDEN)
NPROC = bounded_int(1, MAX_NPROC)
DEVICE = DeviceType()
WARMUP_AUTO = WarmupType()
CLASS_FLOOR = FiniteFloat(0.0, 1.0)
LOGGERS = LoggersType()

weights_option = click.option(
    "--weights", "weights_spec", required=True, metavar="SPEC",
    help="Weighting net: DIR, FILE.safetensors, hub:org/name[@revision] or pretrained:NAME.",
)


def emit(info: dict[str, Any], as_json: bool, print_text: Callable[[dict[str, Any]], None],
         plot_path: Path | None = None) -> None:
    """One JSON object (``--json``) or the human-readable text, plus where the plot went."""
    if plot_path is not None:
        info["plot"] = str(plot_path)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    print_text(info)
    if plot_path is not None:
        from cmw_transfer.cli.text import printable

        click.echo(f"{'plot:':<16}{printable(str(plot_path))}")

"""Options shared by several subcommands, and the validated parameter types every numeric option uses.

Each type checks its value while click parses the command line, so a bad number is one ``error:`` line and
exit 2 before any data, model or worker process is started. Numbers are written with ASCII digits only
(:mod:`cmw_transfer.parsing`: Python's ``int`` / ``float`` would read ``٣`` as 3); floats must be finite and
representable in float32, the dtype they end up multiplying (neither above its maximum nor a subnormal), ints
must lie in a documented range, which click prints in ``--help``. Counts of processes, threads and loader
workers are also bounded by this machine (its CPUs, its open-file limit, its GPUs).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cmw_transfer.errors import UserError
from cmw_transfer.parsing import ascii_float, ascii_int, parse_int_list, parse_name_list

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
MAX_CLASS_INDEX = 999_999  # the largest label a list: dataset may have (dataset.lists.MAX_LIST_CLASSES - 1)
# below this a step changes no float32 weight (lr x gradient under float32's relative precision of ~1e-7 for any
# gradient < 1e5): a typo (1e-320, 1e-30), not a learning rate
MIN_LR = 1e-12
WORKERS_PER_CPU = 4  # more loader workers per CPU only wait for each other (torch already warns above one per CPU)
FILES_PER_WORKER = 16  # descriptors a persistent worker holds in the parent (~5, measured) x train/eval loaders


class FiniteFloat(click.FloatRange):
    """A finite float (no nan / inf, within +-float32 max) inside ``[min, max]``; ends may be open."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False,
                 max_open: bool = False) -> None:
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = ascii_float(value, "the value", finite=False)
        except UserError as exc:
            self.fail(f"{exc}.", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        number = super().convert(number, param, ctx)
        if abs(number) > FLOAT32_MAX:
            self.fail(f"{value!r} is too large (at most {FLOAT32_MAX:.3g} in magnitude).", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"FiniteFloat({self._describe_range()})"


class AsciiIntRange(click.IntRange):
    """click's IntRange (the range shows in ``--help``) over integers written with ASCII digits only: ``٣``,
    ``1_000`` or, from a config file, ``3.0`` and ``true`` are refused instead of read as numbers."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = ascii_int(value, "the value")
        except UserError as exc:
            self.fail(f"{exc}.", param, ctx)
        return super().convert(number, param, ctx)


def bounded_int(min: int | None = None, max: int | None = None) -> click.IntRange:
    """An int inside ``[min, max]``, written with ASCII digits."""
    return AsciiIntRange(min=min, max=max)


class MachineBound(AsciiIntRange):
    """A count of workers, threads or processes: inside the static range and within what this machine can run
    (:func:`machine_limit`), checked while parsing."""

    def __init__(self, kind: str, min: int, max: int) -> None:
        super().__init__(min=min, max=max)
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = super().convert(value, param, ctx)
        limit, why = machine_limit(self.kind)
        if number > limit:
            self.fail(f"{number} is more than this machine can run: at most {limit} ({why}).", param, ctx)
        return number


def machine_limit(kind: str) -> tuple[int, str]:
    """``(limit, reason)`` for ``"workers"`` (per process), ``"threads"`` or ``"processes"`` on this machine."""
    from cmw_transfer.runtime import available_cpus

    cpus = available_cpus()
    if kind == "threads":
        return cpus, f"{cpus} CPU(s) available to this process; more threads only wait for each other"
    if kind == "processes":
        return cpus, f"{cpus} CPU(s) available to this process"
    limit, why = WORKERS_PER_CPU * cpus, f"{WORKERS_PER_CPU} per CPU, {cpus} CPU(s) available"
    try:
        import resource

        files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        unlimited = files == resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # not a POSIX system: no descriptor limit to respect
        files, unlimited = 0, True
    by_files = max(0, (files - 256) // FILES_PER_WORKER)
    if not unlimited and by_files < limit:
        limit, why = by_files, f"the open-file limit is {files} (ulimit -n), {FILES_PER_WORKER} per worker"
    return limit, why


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a CUDA/MPS request must be satisfiable here.

    torch accepts more device strings (``meta``, ``xla``, ...) on which training cannot run, so the set is
    closed rather than delegated to ``torch.device``.
    """

    name = "device"
    _PATTERN = re.compile(r"(auto|cpu|mps|cuda(:[0-9]{1,4})?)")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not self._PATTERN.fullmatch(text):
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
        from cmw_transfer.defaults import LOGGERS

        if isinstance(value, tuple) and not value:  # a config file's "none"
            return value
        name = _option_name(param)
        try:
            return parse_name_list(value if isinstance(value, tuple) else str(value), name, choices=LOGGERS)
        except UserError as exc:
            self.fail(_without_name(exc, name), param, ctx)


def _option_name(param: click.Parameter | None) -> str:
    return param.opts[0] if param is not None and param.opts else "the value"


def _without_name(exc: UserError, name: str) -> str:
    """A parser's message minus the leading option name, which click's "Invalid value for ..." already says."""
    text = str(exc)
    for prefix in (f"{name}: ", f"{name} "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class IntListType(click.ParamType):
    """A comma-separated list of integers, parsed strictly (:func:`cmw_transfer.parsing.parse_int_list`)."""

    def __init__(self, name: str, example: str, noun: str, *, low: int, high: int, ascending: bool) -> None:
        self.name, self.example, self.noun = name, example, noun
        self.low, self.high, self.ascending = low, high, ascending

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple) and not value:  # a config file's "none"
            return value
        name = _option_name(param)
        try:
            return parse_int_list(value, name, example=self.example, noun=self.noun, low=self.low, high=self.high,
                                  ascending=self.ascending)
        except UserError as exc:
            self.fail(_without_name(exc, name), param, ctx)


def check_file_values(values: dict[str, object], ctx: click.Context, path: str) -> dict[str, object]:
    """``values`` (from ``--config path``) with each one converted by the option of the same name: a number out
    of range, a subnormal lr, ``2.5`` or ``true`` for an epoch count is the option's own error, naming the file."""
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and not p.is_flag}
    out = dict(values)
    for name, value in values.items():
        param = params.get(name)
        if param is None or value is None or param.multiple or isinstance(param.type, click.types.StringParamType):
            continue
        if isinstance(value, (list, tuple)) and not value and isinstance(param.type, (IntListType, LoggersType)):
            continue  # an empty list: the option's "none"
        try:
            out[name] = param.type.convert(tuple(value) if isinstance(value, list) else value, param, ctx)
        except click.BadParameter as exc:
            raise UserError(f"--config {path}: {name}: {exc.format_message()}") from None
    return out


LOG_HELP = ("Loggers beside metrics.jsonl, comma-separated: csv (metrics.csv, one row per epoch) and/or "
            "tensorboard (event files in OUT/tensorboard; pip install 'cmw-transfer[tensorboard]'). Under torchrun "
            "spell it --loggers (torchrun reads --log as its own --log-dir).")


def log_option(default: str | None) -> Callable[[Any], Any]:
    """``--log`` / ``--loggers``: the second spelling passes through torchrun, whose argument parser takes ``--log``
    for an ambiguous abbreviation of its ``--log-dir`` / ``--logs-specs`` (the ``--nproc`` relaunch uses it)."""
    return click.option("--log", "--loggers", "log", type=LOGGERS, default=default, help=LOG_HELP)


# -- the types the commands use ----------------------------------------------------------------------------------
LR = FiniteFloat(MIN_LR, MAX_LR)
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
WORKERS = MachineBound("workers", 0, MAX_WORKERS)
THREADS = MachineBound("threads", 1, 1024)
FAMILIES = bounded_int(1, MAX_FAMILIES)
HIDDEN = bounded_int(1, MAX_HIDDEN)
NPROC = bounded_int(1, MAX_NPROC)  # bounded by the machine once --device is known (cli.apply_cmd.check_nproc)
MILESTONES = IntListType("E1,E2", "30,60", "epochs", low=1, high=MAX_EPOCHS, ascending=True)
CLASS_LIST = IntListType("LIST", "7,8,9", "class indices", low=0, high=MAX_CLASS_INDEX, ascending=True)
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

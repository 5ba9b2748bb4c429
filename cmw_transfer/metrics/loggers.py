"""Epoch loggers beside ``metrics.jsonl`` (``--log csv,tensorboard``): the same rows, for other readers.

``metrics.jsonl`` stays the record a resume trusts; a logger only mirrors its rows, so it can never disagree
with it:

- ``csv``: ``metrics.csv``, one row per epoch with the numbers of ``metrics.jsonl`` (floats as ``repr``, so
  they read back exactly; ``null`` as an empty cell; lists and booleans as JSON). Its header is ``epoch``, then
  every key any row has, sorted: the same for a resumed run as for an uninterrupted one. The file is rewritten
  atomically from the rows after every epoch, so a resume (which truncates ``metrics.jsonl`` to the epochs its
  checkpoint holds) leaves no duplicated or torn row.
- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files under ``<out>/tensorboard/``, every
  numeric value of a row as a scalar under its ``metrics.jsonl`` key, at ``global_step`` = the epoch. A resume
  opens the writer with ``purge_step`` = its first epoch, so TensorBoard hides what the interrupted session
  logged for epochs that are trained again; a fresh run (``--overwrite``) first removes old event files.

The engine creates them on rank 0 only (:func:`create_loggers`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from cmw_transfer.atomic import write_text
from cmw_transfer.defaults import TENSORBOARD_HINT
from cmw_transfer.errors import UserError
from cmw_transfer.metrics.log import strict_json

CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class EpochLogger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def csv_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """``epoch`` first, then every other key of any row, sorted."""
    keys = {key for row in rows for key in row} - {"epoch"}
    return ["epoch", *sorted(keys)]


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, allow_nan=False)  # a float as repr: it reads back exactly


class CSVLogger:
    """``metrics.csv``, rebuilt from the rows (those a resume kept, then one per epoch) after every epoch."""

    def __init__(self, path: str | Path, rows: Iterable[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.rows = [strict_json(dict(row)) for row in rows]
        self._write()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(strict_json(dict(row)))
        self._write()

    def close(self) -> None:
        pass

    def _write(self) -> None:
        columns = csv_columns(self.rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if self.rows:
            writer.writerow(columns)
            writer.writerows([csv_cell(row.get(key)) for key in columns] for row in self.rows)
        write_text(self.path, buffer.getvalue())


class TensorBoardLogger:
    """Scalars per epoch in ``directory`` (``torch.utils.tensorboard``)."""

    def __init__(self, directory: str | Path, *, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None
        self.directory = Path(directory)
        if purge_step is None:  # a fresh run: the events of the run it replaces would mix with its own
            for old in self.directory.glob("events.out.tfevents.*"):
                old.unlink(missing_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=purge_step)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for key, value in sorted(row.items()):
            if key == "epoch" or value is None or isinstance(value, (str, list, dict, tuple)):
                continue
            if isinstance(value, (bool, int, float)):
                self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def create_loggers(names: Iterable[str], out: str | Path, *, rows: list[dict[str, Any]],
                   first_epoch: int | None) -> list[EpochLogger]:
    """The loggers ``names`` asks for, in ``out``; ``rows``: what ``metrics.jsonl`` holds now; ``first_epoch``:
    the label of the first epoch this session trains when it resumes a run (None for a fresh run)."""
    out = Path(out)
    loggers: list[EpochLogger] = []
    for name in names:
        if name == "csv":
            loggers.append(CSVLogger(out / CSV_NAME, rows))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(out / TENSORBOARD_DIR, purge_step=first_epoch))
        else:
            raise UserError(f"--log: unknown logger {name!r}")
    return loggers

"""The training engine: one epoch loop for every stage (apply's ERM and OLTR, meta-train, and those to come).

Contract
--------
The engine owns what every stage shares; a stage (a :class:`Stage` subclass registered with
:func:`~cmw_transfer.trainer.engine.registry.register_trainer`) owns its model, optimizer and step.
``Engine(stage).run()``:

1. ``RunDirectory`` policy, then (rank 0) the directory lock and the cleaning of dead writers' temporaries;
2. with ``resume``: the checkpoint is loaded (``weights_only``), its fingerprint (``stage.fingerprint()``),
   structure (``ENGINE_KEYS`` + ``stage.state_keys``, an epoch inside the run) and identity
   (``stage.identity()``) are validated, then ``stage.load_state_dict(state)``; any mismatch is one ``UserError``;
3. ``stage.start(epoch)`` (wrap for DDP, continue the schedule) and ``stage.write_start_files()`` (rank 0);
4. for every remaining epoch ``e`` (0-based index; its label in logs and checkpoints is ``e + stage.first_epoch``,
   1 for every stage):
   ``note = stage.begin_epoch(e)`` -> ``stage.seed_epoch(e)`` (every random stream from ``(seed, e, rank)``) ->
   ``stage.train_loader().set_epoch(e)`` -> ``stage.train_step(step, batch)`` for each batch (returns the number
   of samples, for the progress bar) -> ``row = stage.end_epoch(e, seconds)`` (train statistics, reduced over ranks)
   -> non-finite ``train_loss`` stops the run (the last checkpoint stays intact) ->
   ``row |= stage.evaluate(e, last)`` -> rank 0 appends ``row`` to ``metrics.jsonl`` (strict JSON, torn-tail safe),
   passes it to the loggers ``stage.log`` names (``--log csv,tensorboard``: :mod:`cmw_transfer.metrics.loggers`),
   prints ``stage.epoch_line(row)`` and writes the checkpoint atomically:
   ``{fingerprint, epoch: label, first_epoch, identity, **stage.state_dict()}``;
5. ``summary = stage.finish(rows)`` (exports, summary files), rank 0 writes it if ``stage.summary_name``.

Every stage counts epochs from 1. A checkpoint records the label of its first epoch (``first_epoch``); one that
does not (written before it was recorded) counts from ``stage.legacy_first_epoch`` (meta-train runs counted from
0): its epoch and the labels of the ``metrics.jsonl`` rows a resume keeps are translated, so such a run resumes
exactly and its log reads as if it had always counted from 1.

Resume is exact because nothing random carries over an epoch boundary except what the checkpoint holds: the
loaders' order and worker seeds are functions of ``(seed, epoch)`` and ``seed_epoch`` re-seeds the rest.

SIGINT and SIGTERM are handled here, once: the run stops at the next step boundary (at once under DDP, where
torchrun signals every rank) with :class:`Interrupted` (a ``KeyboardInterrupt``: exit 130 from the CLI), and the
checkpoint of the last finished epoch is intact.
Callbacks (:func:`register_callback`) see every step and epoch: tests use them to inject faults.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from cmw_transfer.atomic import write_json
from cmw_transfer.errors import UserError
from cmw_transfer.metrics.log import METRICS_NAME, MetricsLog, strict_json
from cmw_transfer.metrics.loggers import EpochLogger, create_loggers
from cmw_transfer.progress import progress_bar, progress_write
from cmw_transfer.trainer.engine.checkpoint import (
    CHECKPOINT_NAME,
    check_structure,
    load_checkpoint,
    restore_error,
    save_checkpoint,
)
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.loaders import derive_seed
from cmw_transfer.trainer.engine.rundir import RunDirectory


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM: the run stopped between two steps; the last epoch's checkpoint is intact."""

    def __init__(self, signum: int, out: Path, epoch_label: int | None) -> None:
        name = signal.Signals(signum).name
        if epoch_label is None:  # nothing to resume from: say what does work
            super().__init__(f"{name}: stopped before the first epoch ended; {out} holds no checkpoint: start "
                             "again with --overwrite")
        else:
            super().__init__(f"{name}: stopped; the checkpoint in {out} (epoch {epoch_label}) is intact, --resume "
                             "continues")
        self.signum = signum


class Callback(Protocol):
    """Observer of a run (tests inject faults through it); both hooks are optional."""

    def on_step(self, stage: Stage, epoch: int, step: int) -> None: ...

    def on_epoch_end(self, stage: Stage, epoch: int, row: dict[str, Any]) -> None: ...


_CALLBACKS: list[Any] = []


def register_callback(callback: Any) -> Any:
    """Call ``callback.on_step`` / ``on_epoch_end`` in every run of this process; returns it (for removal)."""
    _CALLBACKS.append(callback)
    return callback


def remove_callback(callback: Any) -> None:
    if callback in _CALLBACKS:
        _CALLBACKS.remove(callback)


def _notify(hook: str, *args: Any) -> None:
    for callback in list(_CALLBACKS):
        fn = getattr(callback, hook, None)
        if fn is not None:
            fn(*args)


class Stage:
    """A stage plug-in: the hooks the engine calls, with the defaults most stages want.

    Set by the subclass: ``kind`` (run-directory kind), ``first_epoch`` (label of epoch index 0), ``state_keys``
    (checkpoint keys ``load_state_dict`` needs), ``summary_name`` (a file for ``finish``'s result, or None), and
    in ``__init__``: ``self.ctx`` (:class:`DistributedContext`), ``self.out`` (``Path``), ``self.seed``,
    ``self.progress``, ``self.batch_size``, optionally ``self.log`` (the ``--log`` loggers).
    """

    kind: ClassVar[str] = ""
    first_epoch: ClassVar[int] = 1
    state_keys: ClassVar[tuple[str, ...]] = ()
    summary_name: ClassVar[str | None] = None
    legacy_first_epoch: ClassVar[int | None] = None  # the label of epoch 0 in checkpoints that do not record it
    distributed: ClassVar[bool] = True  # one rank of a torchrun job (False: always a single process)
    log: tuple[str, ...] = ()

    ctx: DistributedContext
    out: Path
    seed: int
    progress: bool
    batch_size: int

    @classmethod
    def from_config(cls, cfg: Any, ctx: DistributedContext) -> Stage:
        """The launcher's hook (:func:`~cmw_transfer.trainer.engine.launch.run_stage`): the stage of ``cfg`` on
        ``ctx``, with its data, model and optimizers; never its engine."""
        return cls(cfg, ctx)  # type: ignore[call-arg]

    # -- identity and state -----------------------------------------------------------------------------------------
    def total_epochs(self) -> int:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a resume must match beyond the configuration (artifact digest, schedule length)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- the run ----------------------------------------------------------------------------------------------------
    def start(self, epoch: int) -> None:
        """After restoring (or not), before the first epoch ``epoch``: DDP wrapping, schedule position."""

    def write_start_files(self, start_epoch: int, resumed: bool) -> None:
        """Rank 0, lock held: the configuration files of the run directory."""

    def begin_epoch(self, epoch: int) -> str:
        """Before seeding: stage switches, meta-set rebuilds, statistics reset. Returns a progress-bar note."""
        return ""

    def seed_epoch(self, epoch: int) -> None:
        torch.manual_seed(derive_seed(self.seed, epoch, self.ctx.rank))

    def train_loader(self) -> Any:
        raise NotImplementedError

    def train_step(self, step: int, batch: Any) -> int:
        """One optimisation step on ``batch``; returns the number of samples it trained on."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        """The epoch's training statistics (the same on every rank)."""
        return {}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        return {}

    def epoch_line(self, row: dict[str, Any]) -> str | None:
        """The console line for an epoch (rank 0), or None."""
        return None

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        """After the last epoch (also when a resume found nothing left to train): exports and the summary."""
        return {}


class Engine:
    def __init__(self, stage: Stage, *, resume: bool = False, overwrite: bool = False) -> None:
        self.stage, self.resume, self.overwrite = stage, resume, overwrite
        self.rundir = RunDirectory(str(stage.out), stage.kind, resume=resume, overwrite=overwrite)
        self._signal: int | None = None
        self._last_label: int | None = None
        self._start: int | None = None
        self._loggers: list[EpochLogger] = []
        self._relabel = 0  # added to the epoch labels of a legacy checkpoint's log rows

    @property
    def start_epoch(self) -> int:
        """The index of the first epoch to train (known once the checkpoint is restored: 0 before)."""
        return self._start or 0

    def run(self) -> dict[str, Any]:
        stage, ctx = self.stage, self.stage.ctx
        if ctx.is_main:
            self.rundir.acquire()
        try:
            start = self._start if self._start is not None else (self.restore() if self.resume else 0)
            stage.start(start)
            log = None
            if ctx.is_main:
                stage.write_start_files(start, resumed=self.resume)
                log = MetricsLog(stage.out / METRICS_NAME,
                                 resume_from_epoch=start + stage.first_epoch if self.resume else None,
                                 relabel=self._relabel)
                self._loggers = create_loggers(stage.log, stage.out, rows=log.read(),
                                               first_epoch=start + stage.first_epoch if self.resume else None)
            t_run = time.perf_counter()
            with self._signals():
                for epoch in range(start, stage.total_epochs()):
                    self._epoch(epoch, log)
            # an interrupt during the export is Python's own: files are written atomically and a resume re-exports
            summary = strict_json(stage.finish(log.read() if log is not None else [], time.perf_counter() - t_run))
            if ctx.is_main and stage.summary_name:
                write_json(stage.out / stage.summary_name, summary)
            ctx.barrier()
            return summary
        finally:
            for logger in self._loggers:
                logger.close()
            self._loggers = []
            self.rundir.release()

    def restore(self, state: dict[str, Any] | None = None) -> int:
        """Validate the checkpoint (loaded here unless given) and load it into the stage; returns the index of the
        next epoch. ``run`` calls it when it was not called before."""
        stage = self.stage
        path = stage.out / CHECKPOINT_NAME
        if state is None:
            state = load_checkpoint(path, stage.fingerprint(), getattr(stage, "cfg", None))
        state = self._translate_epochs(state, path)
        start = check_structure(state, path, required=stage.state_keys, first_epoch=stage.first_epoch,
                                total_epochs=stage.total_epochs(), identity=stage.identity())
        try:
            stage.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise restore_error(path, exc) from None
        self._last_label = start - 1 + stage.first_epoch if start else None
        self._start = start
        return start

    def _translate_epochs(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """A checkpoint whose epochs count from another origin (a legacy one): its epoch in this stage's labels."""
        stage = self.stage
        legacy = stage.first_epoch if stage.legacy_first_epoch is None else stage.legacy_first_epoch
        origin = state.get("first_epoch", legacy)
        if isinstance(origin, bool) or not isinstance(origin, int):
            raise UserError(f"--resume: {path} is damaged (first_epoch is {origin!r}); delete it (or use "
                            "--overwrite) to start over")
        self._relabel = stage.first_epoch - origin
        if self._relabel and isinstance(state.get("epoch"), int) and not isinstance(state["epoch"], bool):
            state = {**state, "epoch": state["epoch"] + self._relabel}
        return state

    def _epoch(self, epoch: int, log: MetricsLog | None) -> None:
        stage, ctx = self.stage, self.stage.ctx
        label = epoch + stage.first_epoch
        note = stage.begin_epoch(epoch)
        stage.seed_epoch(epoch)
        loader = stage.train_loader()
        loader.set_epoch(epoch)
        bar = progress_bar(total=len(loader) * stage.batch_size * ctx.world_size, unit="img", unit_scale=True,
                           leave=False, desc=f"epoch {label}/{stage.total_epochs() - 1 + stage.first_epoch}{note}",
                           enabled=ctx.is_main and stage.progress)
        t0 = time.perf_counter()
        try:
            for step, batch in enumerate(loader):
                _notify("on_step", stage, epoch, step)
                bar.update(stage.train_step(step, batch) * ctx.world_size)
                self._check_signal()
        except Exception:
            self._check_signal()  # a DataLoader worker that died of the same signal: report the interrupt
            raise
        finally:
            bar.close()
        row: dict[str, Any] = {"epoch": label, **stage.end_epoch(epoch, time.perf_counter() - t0)}
        loss = row.get("train_loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise UserError(f"non-finite training loss ({loss}) in epoch {label}: the run diverged; the last "
                            f"checkpoint ({stage.out / CHECKPOINT_NAME}) is intact; lower --lr")
        row.update(stage.evaluate(epoch, epoch + 1 == stage.total_epochs()))
        if ctx.is_main:
            assert log is not None
            log.append(row)
            for logger in self._loggers:
                logger.log(row)
            line = stage.epoch_line(row)
            if line:
                progress_write(line)
            save_checkpoint(stage.out / CHECKPOINT_NAME, {"fingerprint": stage.fingerprint(), "epoch": label,
                                                          "first_epoch": stage.first_epoch,
                                                          "identity": stage.identity(), **stage.state_dict()})
        self._last_label = label
        _notify("on_epoch_end", stage, epoch, row)
        ctx.barrier()
        self._check_signal()

    # -- signals ----------------------------------------------------------------------------------------------------
    def _check_signal(self) -> None:
        if self._signal is not None:
            exc = Interrupted(self._signal, self.stage.out, self._last_label)
            if self.stage.ctx.is_main:  # the CLI reports a KeyboardInterrupt as a bare "aborted"
                progress_write(f"interrupted by {exc}")
            raise exc

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM set a flag the loop checks between steps; a second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            # under DDP every rank must leave at the same step or the others wait in a collective: leave at once
            # (torchrun signals every rank and ends the job); a second SIGINT does not wait either
            if self.stage.ctx.enabled or (self._signal is not None and signum == signal.SIGINT):
                raise Interrupted(signum, self.stage.out, self._last_label)
            self._signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

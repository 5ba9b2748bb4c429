"""The one way to run a stage: checks that need no data, the stage, its engine, and the process group around it.

``run_stage(cfg)`` for any stage configuration (:class:`~cmw_transfer.trainer.config.StageConfig`):

1. ``cfg.validate()``; the run directory's policy (:class:`RunDirectory`, nothing written yet);
2. with ``cfg.resume``: the checkpoint is loaded and its fingerprint checked, so a checkpoint of another
   configuration is refused before any data or model is loaded;
3. the process: one rank of a torchrun job (``DistributedContext.from_env``) or, for a stage that is not
   ``distributed``, a single process on ``cfg.device``;
4. ``stage = cls.from_config(cfg, ctx)`` (the registered stage ``cfg.trainer_name()`` builds its data, model and
   optimizers; never its engine), ``Engine(stage)`` restores step 2's checkpoint into it, and ``run()`` trains;
5. the process group is torn down, also on failure.

:func:`launch` is steps 1-4 without the run: the engine, ready to run, for callers that look into the stage
(``engine.stage``: tests, studies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmw_transfer.trainer.config import StageConfig
from cmw_transfer.trainer.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint
from cmw_transfer.trainer.engine.distributed import DistributedContext, resolve_device
from cmw_transfer.trainer.engine.loop import Engine
from cmw_transfer.trainer.engine.registry import trainer_class
from cmw_transfer.trainer.engine.rundir import RunDirectory


def preflight(cfg: StageConfig) -> dict[str, Any] | None:
    """Every check that needs no data; returns the checkpoint a resume continues (None without ``--resume``)."""
    cfg.validate()
    cls = trainer_class(cfg.trainer_name())
    RunDirectory(cfg.out, cls.kind, resume=cfg.resume, overwrite=cfg.overwrite).check()
    return load_checkpoint(Path(cfg.out) / CHECKPOINT_NAME, cfg.fingerprint(), cfg) if cfg.resume else None


def context(cfg: StageConfig) -> DistributedContext:
    """This process: a torchrun rank (``WORLD_SIZE`` > 1) for a distributed stage, else one process."""
    if trainer_class(cfg.trainer_name()).distributed:
        return DistributedContext.from_env(cfg.device)
    return DistributedContext(resolve_device(cfg.device))


def start(cfg: StageConfig, ctx: DistributedContext, state: dict[str, Any] | None = None) -> Engine:
    """The stage of ``cfg`` and its engine, ready to run; ``state`` (from :func:`preflight`) is restored now,
    otherwise a resume restores the checkpoint when the run starts."""
    stage = trainer_class(cfg.trainer_name()).from_config(cfg, ctx)
    engine = Engine(stage, resume=cfg.resume, overwrite=cfg.overwrite)
    if state is not None:
        engine.restore(state)
    return engine


def launch(cfg: StageConfig) -> Engine:
    """:func:`run_stage` up to the run: checks, process, stage, engine (a distributed stage's process group stays
    up: the caller tears it down with ``engine.stage.ctx.teardown()``)."""
    state = preflight(cfg)
    return start(cfg, context(cfg), state)


def run_stage(cfg: StageConfig) -> dict[str, Any]:
    """Run (or, with ``cfg.resume``, continue) the stage ``cfg`` configures; returns its summary (every rank)."""
    state = preflight(cfg)
    ctx = context(cfg)
    try:
        return start(cfg, ctx, state).run()
    finally:
        ctx.teardown()

"""The engine every stage runs on: the epoch loop (``loop``), the stage registry, checkpoints, the run
directory, the memory check, evaluation, deterministic loaders, DDP and the optimizer factory."""

from cmw_transfer.trainer.engine.loop import Engine, Interrupted, Stage, register_callback, remove_callback
from cmw_transfer.trainer.engine.registry import create_trainer, list_trainers, register_trainer, trainer_class

__all__ = ["Engine", "Interrupted", "Stage", "create_trainer", "list_trainers", "register_callback",
           "register_trainer", "remove_callback", "trainer_class"]

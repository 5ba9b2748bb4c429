"""Stage registry, in the timm style: ``@register_trainer("name")`` on a
:class:`~cmw_transfer.trainer.engine.loop.Stage` subclass, ``create_trainer("name", ...)`` to build one.

The built-in stages are imported on first use (their module is named in ``_BUILTIN``), so nothing below a stage
imports it and the package has no import cycle: ``apply`` never imports ``oltr``, it asks the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from cmw_transfer.errors import UserError

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}
_BUILTIN = {
    "erm": "cmw_transfer.trainer.apply.erm",
    "oltr": "cmw_transfer.trainer.apply.oltr",
    "metatrain": "cmw_transfer.trainer.metatrain.stage",
    "advisor": "cmw_transfer.trainer.metatrain.advisor",
    "probe": "cmw_transfer.trainer.curvenet.probe",
    "curvenet": "cmw_transfer.trainer.curvenet.allocate",
}


def register_trainer(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make the stage available as ``create_trainer(name, ...)``."""

    def decorate(cls: type[T]) -> type[T]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a trainer named '{name}' is already registered ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = cls
        return cls

    return decorate


def trainer_class(name: str) -> type:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise UserError(f"unknown trainer '{name}'; available: {', '.join(list_trainers())}")
    return _REGISTRY[name]


def create_trainer(name: str, *args: Any, **kwargs: Any) -> Any:
    """Build the stage registered as ``name`` (built-in: erm, oltr, metatrain) with the given arguments."""
    return trainer_class(name)(*args, **kwargs)


def list_trainers() -> list[str]:
    return sorted({*_REGISTRY, *_BUILTIN})

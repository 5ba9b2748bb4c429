"""The layering of a stage's settings, lowest first, in one place for every stage (the CLI only collects them).

* meta-train: the dataclass defaults < the source's recipe (:data:`RECIPES`) < CurveNet's recipe (``method
  curvenet``) < the method's defaults (:data:`METHOD_DEFAULTS`) < ``--config FILE`` < the command line;
* probe: the dataclass defaults < the dataset's probe recipe (:data:`PROBE_RECIPES`) < the command line;
* apply: the command line's values (its defaults are the dataclass's) < ``--config FILE`` < the options typed.

``given`` holds the command line's values; ``None`` means "not given" for meta-train and probe options.
``check_file`` (the CLI's) bounds each value the file contributes as the command line's option of that name would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config.apply import ApplyConfig, apply_defaults_for
from cmw_transfer.trainer.config.metatrain import (
    CURVENET_RECIPE,
    METHOD_DEFAULTS,
    CurveNetConfig,
    MetaTrainConfig,
    recipe_for,
)
from cmw_transfer.trainer.config.probe import PROBE_RECIPES, ProbeConfig

FileCheck = Callable[[dict[str, Any]], dict[str, Any]]
# the settings only --method curvenet reads
CURVENET_ONLY = tuple(f.name for f in fields(CurveNetConfig) if f.name not in {g.name for g in fields(MetaTrainConfig)})


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def resolve_metatrain(given: dict[str, Any], config_file: str | None = None,
                      check_file: FileCheck | None = None) -> MetaTrainConfig:
    """A :class:`MetaTrainConfig` (a :class:`CurveNetConfig` for ``method="curvenet"``); ``given["src"]`` picks the
    recipe."""
    given = {k: v for k, v in given.items() if v is not None}
    curvenet = given.get("method") == "curvenet"
    if not curvenet:
        stray = [f"--{k.replace('_', '-')}" for k in CURVENET_ONLY if k in given]
        if stray:
            raise UserError(f"{', '.join(stray)} only apply to --method curvenet")
    cls = CurveNetConfig if curvenet else MetaTrainConfig
    values = {**_defaults(cls), **recipe_for(given["src"])}
    if curvenet:
        values.update(CURVENET_RECIPE, method="curvenet")
    from_file = _from_file(cls, config_file, given, check_file)
    method = given.get("method", from_file.get("method", values["method"]))
    values.update(METHOD_DEFAULTS.get(method, {}))
    values.update(from_file)
    values.update(given)
    return cls.from_dict(values)


def resolve_probe(given: dict[str, Any]) -> ProbeConfig:
    """A :class:`ProbeConfig`; the recipe is the one of ``given["dataset"]``'s base dataset."""
    from cmw_transfer.dataset import resolve_source

    given = {k: v for k, v in given.items() if v is not None}
    try:
        base = resolve_source(given["dataset"])[0]
    except Exception:  # an unknown spec is reported by the dataset loader, with its own message
        base = given["dataset"]
    return ProbeConfig.from_dict({**_defaults(ProbeConfig), **PROBE_RECIPES.get(base, {}), **given})


def resolve_apply(values: dict[str, Any], config_file: str | None = None, typed: frozenset[str] = frozenset(),
                  check_file: FileCheck | None = None) -> ApplyConfig:
    """An :class:`ApplyConfig` from the command line's ``values``; with ``config_file``, the file's settings
    replace every value whose name is not in ``typed`` (the options the user typed)."""
    given = {k: v for k, v in values.items() if k in typed}
    if config_file:
        values = {**_from_file(ApplyConfig, config_file, given, check_file), **given}
    else:  # the dataset's own defaults (model, epochs, lr) under what the user typed
        values = {**values, **apply_defaults_for(str(values["dataset"])), **given}
    return ApplyConfig.from_dict(values)


def _from_file(cls: type, config_file: str | None, given: dict[str, Any], check_file: FileCheck | None
               ) -> dict[str, Any]:
    """The settings of ``--config FILE`` the command line does not override (read and validated by ``cls``)."""
    if not config_file:
        return {}
    values = {k: v for k, v in cls.from_file(config_file).to_dict().items() if k not in given}
    return check_file(values) if check_file is not None else values

"""One configuration dataclass per stage, validated before any work, saved as is, and how they are layered.

``base`` (the shared :class:`StageConfig`), ``apply`` (:class:`ApplyConfig`), ``metatrain``
(:class:`MetaTrainConfig`, :class:`CurveNetConfig`, the recipes and the parsers of their string options),
``probe`` (:class:`ProbeConfig`), ``resolve`` (defaults < recipe < method < file < command line). Every name is
re-exported here; the package is torch-free, so every ``--help`` can import it.
"""

from cmw_transfer.trainer.config.apply import (
    APPLY_DATASET_DEFAULTS,
    EQL_FIELDS,
    OLTR_FIELDS,
    OLTR_SAMPLERS,
    RESUME_FREE,
    TRAINERS,
    WEIGHTINGS,
    ApplyConfig,
    apply_defaults_for,
    parse_open_classes,
)
from cmw_transfer.trainer.config.base import (
    RUN_OPTIONS,
    StageConfig,
    check_loggers,
    config_fingerprint,
    load_config_text,
    parse_loggers,
)
from cmw_transfer.trainer.config.metatrain import (
    ACTUAL_STEPS,
    ADVISOR_FIELDS,
    ADVISOR_PARTS,
    CURVENET_RECIPE,
    DATASET_RECIPES,
    DECAY_FRACTIONS,
    METATRAIN_RESUME_FREE,
    METHOD_DEFAULTS,
    METHODS,
    RECIPES,
    CurveNetConfig,
    MetaSetSpec,
    MetaTrainConfig,
    parse_advisor,
    parse_meta_grad,
    parse_meta_set,
    recipe_for,
)
from cmw_transfer.trainer.config.probe import PROBE_RECIPES, PROBE_RESUME_FREE, ProbeConfig
from cmw_transfer.trainer.config.resolve import resolve_apply, resolve_metatrain, resolve_probe

__all__ = [
    "ACTUAL_STEPS",
    "ADVISOR_FIELDS",
    "ADVISOR_PARTS",
    "APPLY_DATASET_DEFAULTS",
    "CURVENET_RECIPE",
    "DATASET_RECIPES",
    "DECAY_FRACTIONS",
    "EQL_FIELDS",
    "METATRAIN_RESUME_FREE",
    "METHODS",
    "METHOD_DEFAULTS",
    "OLTR_FIELDS",
    "OLTR_SAMPLERS",
    "PROBE_RECIPES",
    "PROBE_RESUME_FREE",
    "RECIPES",
    "RESUME_FREE",
    "RUN_OPTIONS",
    "TRAINERS",
    "WEIGHTINGS",
    "ApplyConfig",
    "CurveNetConfig",
    "MetaSetSpec",
    "MetaTrainConfig",
    "ProbeConfig",
    "StageConfig",
    "apply_defaults_for",
    "check_loggers",
    "config_fingerprint",
    "load_config_text",
    "parse_advisor",
    "parse_loggers",
    "parse_meta_grad",
    "parse_meta_set",
    "parse_open_classes",
    "recipe_for",
    "resolve_apply",
    "resolve_metatrain",
    "resolve_probe",
]

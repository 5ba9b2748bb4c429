"""Classifier backbones: built-ins for CIFAR and the embedded digits, every timm model by name."""

from cmw_transfer.models.factory import create_model, list_builtin_models, parameter_stages, similar_models
from cmw_transfer.models.geometry import check_geometry, data_config, input_geometry

__all__ = ["check_geometry", "create_model", "data_config", "input_geometry", "list_builtin_models",
           "parameter_stages", "similar_models"]

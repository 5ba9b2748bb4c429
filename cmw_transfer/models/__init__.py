"""Classifier backbones: built-ins for CIFAR and the embedded digits, every timm model by name."""

from cmw_transfer.models.factory import create_model, list_builtin_models, parameter_stages

__all__ = ["create_model", "list_builtin_models", "parameter_stages"]

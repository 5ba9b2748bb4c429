"""Weights specs: where a weighting net comes from (directory, file, Hub, shipped)."""

from cmw_transfer.weights.spec import WeightsSpec, list_pretrained, parse_weights_spec, pretrained_path

__all__ = ["WeightsSpec", "list_pretrained", "parse_weights_spec", "pretrained_path"]

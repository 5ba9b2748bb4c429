"""The weighting-net artifact: the net, its scale families, its file format."""

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.artifact.scales import (
    DegenerateScalesWarning,
    assign_families,
    fit_families,
    fit_scale_centers,
)

__all__ = ["CMWNet", "DegenerateScalesWarning", "assign_families", "fit_families", "fit_scale_centers"]

"""cmw-transfer: meta-train a sample-weighting net once, deploy it anywhere."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cmw-transfer")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from cmw_transfer.artifact import (
    CMWNet,
    DegenerateScalesWarning,
    assign_families,
    fit_families,
    fit_scale_centers,
)
from cmw_transfer.errors import UserError

__all__ = [
    "CMWLoss",
    "CMWNet",
    "DegenerateScalesWarning",
    "UserError",
    "__version__",
    "assign_families",
    "fit_families",
    "fit_scale_centers",
]

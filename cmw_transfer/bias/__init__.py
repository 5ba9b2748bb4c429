"""Label-bias generators (pure NumPy, seeded): symmetric, asymmetric, PMD and hybrid noise, long tails."""

from cmw_transfer.bias.apply import apply_bias, default_asym_map
from cmw_transfer.bias.eta import estimate_eta
from cmw_transfer.bias.imbalance import long_tail_counts, long_tail_indices
from cmw_transfer.bias.maps import resolve_map
from cmw_transfer.bias.noise import asymmetric_noise, symmetric_noise
from cmw_transfer.bias.pmd import expected_pmd_rate, pmd_factor_for_rate, pmd_noise
from cmw_transfer.bias.result import NoiseResult
from cmw_transfer.bias.spec import BiasSpec, parse_noise

__all__ = [
    "BiasSpec",
    "NoiseResult",
    "apply_bias",
    "asymmetric_noise",
    "default_asym_map",
    "estimate_eta",
    "expected_pmd_rate",
    "long_tail_counts",
    "long_tail_indices",
    "parse_noise",
    "pmd_factor_for_rate",
    "pmd_noise",
    "resolve_map",
    "symmetric_noise",
]

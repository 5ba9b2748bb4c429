"""The ``--noise`` grammar and :class:`BiasSpec`, the parsed form of "which bias to inject".

Grammar: steps joined by ``+``, applied left to right::

    sym:RATE[:incl]     uniform noise; with ``incl`` the redrawn label may be the true one (see symmetric_noise)
    asym:RATE[:MAP]     class-map noise; MAP one of auto, cifar10, cifar100, cifar100-blocks, digits,
                        fashion-mnist, pairflip
                        (default: the dataset's own map, see apply_bias)
    pmd1:RATE | pmd2:RATE | pmd3:RATE   PMD Type-I/II/III at a target noise rate; only as the first step,
                        because PMD labels depend on eta alone and would erase any earlier step

Parsed steps are tuples: ``("sym", 0.4)``, ``("sym", 0.4, "incl")``, ``("asym", 0.3)``,
``("asym", 0.3, "pairflip")``, ``("pmd", 1, 0.35)``. Every rate is in [0, 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cmw_transfer.bias.imbalance import check_imbalance
from cmw_transfer.bias.maps import MAP_NAMES
from cmw_transfer.bias.result import check_rate
from cmw_transfer.errors import UserError

GRAMMAR = "STEP[+STEP...] with STEP = sym:RATE[:incl] | asym:RATE[:MAP] | pmd1:RATE | pmd2:RATE | pmd3:RATE"
_STEP = re.compile(r"^(sym|asym|pmd([0-9]+))\s*:\s*([^:]+?)\s*(?::\s*([A-Za-z0-9_-]+))?$")

Step = tuple


@dataclass(frozen=True)
class BiasSpec:
    """Noise steps (applied left to right) and an optional long-tail imbalance factor (applied first)."""

    noise: tuple[Step, ...] = ()
    imbalance: float | None = None

    def __post_init__(self) -> None:
        if self.imbalance is not None:
            object.__setattr__(self, "imbalance", check_imbalance(self.imbalance))
        for k, step in enumerate(self.noise):
            if step[0] == "pmd" and k > 0:
                raise UserError("a pmd step must come first in --noise (PMD labels depend only on the classifier's "
                                "top-2 classes and would overwrite earlier noise), e.g. pmd1:0.35+asym:0.3")

    @property
    def is_empty(self) -> bool:
        return not self.noise and self.imbalance is None

    def noise_text(self) -> str:
        """The canonical ``--noise`` string (round-trips through :func:`parse_noise`)."""
        return "+".join(format_step(step) for step in self.noise)

    def __str__(self) -> str:
        parts = [self.noise_text()] if self.noise else []
        if self.imbalance is not None:
            parts.append(f"imbalance:{self.imbalance:g}")
        return " + ".join(parts) if parts else "none"


def format_step(step: Step) -> str:
    if step[0] == "pmd":
        return f"pmd{step[1]}:{step[2]:g}"
    text = f"{step[0]}:{step[1]:g}"
    return text + (f":{step[2]}" if len(step) > 2 else "")


def parse_noise(text: str | None) -> tuple[Step, ...]:
    """Parse ``"sym:0.4+asym:0.2"`` / ``"pmd1:0.35+asym:0.3"`` into step tuples; ``""``/``"none"`` -> ``()``."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "none":
        return ()
    steps: list[Step] = []
    for raw in str(text).split("+"):
        part = raw.strip().lower()
        match = _STEP.match(part)
        if not match:
            raise UserError(f"cannot parse noise step {raw.strip()!r} in {text!r}; expected {GRAMMAR}")
        kind, pmd_type, rate_text, option = match.groups()
        rate = check_rate(rate_text, f"noise rate in {raw.strip()!r}")
        if pmd_type is not None:
            if int(pmd_type) not in (1, 2, 3) or option is not None:
                raise UserError(f"unknown PMD step {raw.strip()!r}; use pmd1:RATE, pmd2:RATE or pmd3:RATE")
            steps.append(("pmd", int(pmd_type), rate))
        elif kind == "sym":
            if option not in (None, "incl", "excl"):
                raise UserError(f"sym option must be 'incl' (true class may be redrawn) or 'excl', got {option!r}")
            steps.append(("sym", rate, "incl") if option == "incl" else ("sym", rate))
        else:
            if option is not None and option not in MAP_NAMES:
                raise UserError(f"unknown asymmetric map {option!r} in {raw.strip()!r}; known: {', '.join(MAP_NAMES)}")
            steps.append(("asym", rate, option) if option is not None else ("asym", rate))
    BiasSpec(tuple(steps))  # validates the step order
    return tuple(steps)

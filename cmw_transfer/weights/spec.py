"""Parse ``--weights SPEC`` strings; one grammar for the CLI and the API.

    DIR                       a directory written by CMWNet.save_pretrained
    FILE.safetensors          a lone self-describing weights file
    hub:org/name[@revision]   the Hugging Face Hub (cache and HF_HUB_OFFLINE honoured)
    pretrained:NAME           a net shipped with cmw-transfer (``pretrained/`` in the source tree)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cmw_transfer.errors import UserError

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
REVISION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class WeightsSpec:
    kind: str  # "local" | "hub" | "pretrained"
    target: str  # path, repo id or shipped name
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "local":
            return self.target
        suffix = f"@{self.revision}" if self.revision else ""
        return f"{self.kind}:{self.target}{suffix}"


def parse_weights_spec(spec: str) -> WeightsSpec:
    """Syntax check only: nothing is read or downloaded here."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty weights spec: give a directory, a .safetensors file, hub:org/name or pretrained:NAME")
    if spec.startswith("hub:"):
        repo, _, revision = spec[4:].partition("@")
        bad_revision = bool(revision) and not REVISION_PATTERN.fullmatch(revision)
        if not REPO_ID_PATTERN.fullmatch(repo) or bad_revision or spec.endswith("@"):
            raise UserError(f"malformed hub spec '{spec}': expected hub:org/name or hub:org/name@revision")
        return WeightsSpec("hub", repo, revision or None)
    if spec.startswith("pretrained:"):
        name = spec[len("pretrained:"):]
        if not _NAME.fullmatch(name):
            raise UserError(f"malformed pretrained spec '{spec}': expected pretrained:NAME; known: "
                            f"{', '.join(list_pretrained()) or 'none'}")
        return WeightsSpec("pretrained", name)
    return WeightsSpec("local", spec)


def _pretrained_roots() -> list[Path]:
    roots = []
    try:  # installed wheel: pretrained/ is packaged as cmw_transfer_pretrained
        roots.append(Path(str(resources.files("cmw_transfer_pretrained"))))
    except ModuleNotFoundError:
        pass
    roots.append(Path(__file__).resolve().parents[2] / "pretrained")  # source checkout
    return [r for r in roots if r.is_dir()]


def list_pretrained() -> list[str]:
    names = {p.name for root in _pretrained_roots() for p in root.iterdir() if (p / "model.safetensors").is_file()}
    return sorted(names)


def pretrained_path(name: str) -> Path:
    for root in _pretrained_roots():
        if (root / name / "model.safetensors").is_file():
            return root / name
    known = ", ".join(list_pretrained()) or "none"
    raise UserError(f"unknown pretrained net '{name}'; known: {known}")

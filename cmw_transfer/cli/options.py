"""Options shared by several subcommands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

weights_option = click.option(
    "--weights", "weights_spec", required=True, metavar="SPEC",
    help="Weighting net: DIR, FILE.safetensors, hub:org/name[@revision] or pretrained:NAME.",
)


def emit(info: dict[str, Any], as_json: bool, print_text: Callable[[dict[str, Any]], None],
         plot_path: Path | None = None) -> None:
    """One JSON object (``--json``) or the human-readable text, plus where the plot went."""
    if plot_path is not None:
        info["plot"] = str(plot_path)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    print_text(info)
    if plot_path is not None:
        click.echo(f"{'plot:':<16}{plot_path}")

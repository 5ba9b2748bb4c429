"""Options shared by several subcommands."""

from __future__ import annotations

import click

weights_option = click.option(
    "--weights", "weights_spec", required=True, metavar="SPEC",
    help="Weighting net: DIR, FILE.safetensors, hub:org/name[@revision] or pretrained:NAME.",
)

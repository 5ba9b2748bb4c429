"""``cmw-transfer inspect``: what a weighting net is, where it came from, and what it does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from cmw_transfer.cli.options import emit, weights_option
from cmw_transfer.cli.text import printable
from cmw_transfer.untrusted import shorten

if TYPE_CHECKING:
    from cmw_transfer.artifact.net import CMWNet

def net_method(net: CMWNet) -> str:
    """The method the net was trained with: its provenance says (cmwnet-sl too), else the head count does."""
    method = (net.provenance or {}).get("method")
    if isinstance(method, str) and method:
        return method
    return "mwnet" if net.num_heads == 1 else "cmwnet"


def describe(net: CMWNet, spec: str) -> dict:
    from cmw_transfer.artifact.curves import curves_table, family_names

    return {
        "spec": spec,
        "method": net_method(net),
        "config": net.config(),
        "families": [{"head": i, "name": name, "center": c}
                     for i, (name, c) in enumerate(zip(family_names(net.num_heads), net.centers or []))],
        "curves": curves_table(net),
    }


def _print_text(info: dict) -> None:
    from cmw_transfer.artifact.curves import TABLE_LOSSES

    cfg = info["config"]
    click.echo(f"weights:        {printable(info['spec'])}")
    click.echo(f"method:         {printable(shorten(info['method'], 60))} (K={cfg['num_heads']}, "
               f"hidden={cfg['hidden_size']}, format v{cfg['format_version']})")
    for key, value in sorted((cfg.get("provenance") or {}).items()):
        if key != "method":  # already on the line above; a huge value is shown as a prefix and its length
            click.echo(f"{printable(shorten(key, 60)) + ':':<16}{printable(shorten(str(value)))}")
    if cfg.get("loss_range"):
        click.echo("loss range:     " + ", ".join(f"{printable(shorten(k, 60))}={v:.3g}"
                                                for k, v in sorted(cfg["loss_range"].items())))
    click.echo("families:")
    for fam in info["families"]:
        click.echo(f"  head {fam['head']}  {fam['name']:<8} center {fam['center']:.1f}")
    click.echo("weight vs loss:")
    click.echo("  " + f"{'family':<10}" + "".join(f"{x:>7g}" for x in TABLE_LOSSES))
    for name, row in info["curves"].items():
        click.echo("  " + f"{name:<10}" + "".join(f"{w:>7.2f}" for w in row.values()))


@click.command("inspect")
@weights_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the weighting curves per family as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect_cmd(weights_spec: str, plot_path: Path | None, as_json: bool) -> None:
    """Print a net's config, provenance, centers and weight per family over a loss grid.

    Text output shows a provenance value longer than 200 characters as its prefix and its length; --json
    prints the config exactly as stored."""
    from cmw_transfer.artifact import CMWNet
    from cmw_transfer.artifact.curves import plot_curves

    net = CMWNet.from_pretrained(weights_spec)
    info = describe(net, weights_spec)
    if plot_path is not None:
        plot_curves(net, plot_path)
    emit(info, as_json, _print_text, plot_path)

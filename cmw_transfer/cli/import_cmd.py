"""``cmw-transfer import``: convert the authors' released weighting net into a normal artifact (docs/import.md)."""

from __future__ import annotations

from pathlib import Path

import click

from cmw_transfer.cli.options import DEVICE, EPOCHS, IMG_SIZE, emit

KINDS = ("official-cmwnet", "official-mwnet")  # mirrors cmw_transfer.artifact.official.KINDS (kept torch-free)


def _print_text(info: dict) -> None:
    click.echo(f"{'written:':<16}{info['out']}")
    click.echo(f"{'origin:':<16}{info['origin_file']} (sha256 {info['origin_sha256'][:16]}...)")
    click.echo(f"{'method:':<16}{info['method']} (K={info['num_heads']}, hidden={info['hidden_size']})")
    click.echo(f"{'head map:':<16}{info['head_map']}")
    click.echo(f"{'centers:':<16}{', '.join(f'{c:.1f}' for c in info['centers'])}")
    click.echo(f"{'loss range:':<16}{info['loss_range_note']}")
    click.echo("weight vs loss (toolkit head order):")
    for name, row in info["curves"].items():
        click.echo("  " + f"{name:<10}" + "".join(f"{w:>7.2f}" for w in row.values()))


@click.command("import")
@click.option("--from", "kind", required=True, type=click.Choice(KINDS),
              help="official-cmwnet: the CMW-Net repo's VNet (vnet_119.pth); official-mwnet: the MW-Net repo's "
                   "VNet(1,100,1).")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="DIR", help="Artifact directory.")
@click.option("--head-order", default=None, metavar="I,J,K",
              help="Official head for each toolkit head, smallest class-size family first.  [default: 1,2,0 for a "
                   "3-head CMW-Net (official head 0 = large, 1 = small, 2 = medium)]")
@click.option("--source-counts", default=None, metavar="N1,N2,...",
              help="The source's per-class sample counts, clustered into the centers.  [default for official-cmwnet: "
                   "the authors' CIFAR-10 PMD counts]")
@click.option("--method", type=click.Choice(["cmwnet", "cmwnet-sl", "mwnet"]), default=None,
              help="What the net was meta-trained as.  [default: cmwnet-sl for official-cmwnet, mwnet for "
                   "official-mwnet]")
@click.option("--calibrate-on", default=None, metavar="SPEC",
              help="Record a loss range from a short plain-CE run on this dataset (e.g. digits, cifar10).  "
                   "[default: loss range unknown]")
@click.option("--calibrate-data-dir", default=None, metavar="DIR", help="Root folder of the --calibrate-on data.")
@click.option("--calibrate-model", default="small_cnn", show_default=True, help="Classifier of the calibration run.")
@click.option("--calibrate-epochs", type=EPOCHS, default=3, show_default=True, help="Epochs of the calibration run.")
@click.option("--calibrate-img-size", type=IMG_SIZE, default=None,
              help="Resize for file datasets (timm transforms); the model must take it.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="Device of the calibration run.")
@click.option("--overwrite", is_flag=True, help="Replace an artifact already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def import_cmd(kind: str, path: Path, out: Path, head_order: str | None, source_counts: str | None,
               method: str | None, calibrate_on: str | None, calibrate_data_dir: str | None, calibrate_model: str,
               calibrate_epochs: int, calibrate_img_size: int | None, device: str, overwrite: bool,
               as_json: bool) -> None:
    """Convert PATH, the authors' weighting-net state_dict, into a cmw-transfer artifact in --out.

    PATH is read with torch.load(weights_only=True) only: a file that would unpickle anything but tensors is refused.
    The artifact's provenance and model card record the file's sha256, the official repository, the head map and
    why, the method, the source counts and centers, and the loss range (unknown unless --calibrate-on).
    """
    from cmw_transfer.artifact.curves import curves_table
    from cmw_transfer.artifact.official import from_official, save_official
    from cmw_transfer.errors import UserError

    if out.is_dir() and any(out.iterdir()) and not overwrite:  # before any (possibly long) calibration run
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace the artifact there")
    calibrate = None
    if calibrate_on:
        from cmw_transfer.trainer.calibrate import calibrate_loss_range

        def calibrate() -> tuple[dict[str, float], str]:
            return calibrate_loss_range(calibrate_on, data_dir=calibrate_data_dir, model=calibrate_model,
                                        epochs=calibrate_epochs, device=device, img_size=calibrate_img_size)
    net = from_official(path, kind, head_order=head_order, source_counts=source_counts, method=method,
                        calibrate=calibrate)
    save_official(net, out, overwrite=overwrite)
    prov = net.provenance
    info = {
        "out": str(out), "kind": kind, "origin_file": prov["origin_file"], "origin_sha256": prov["origin_sha256"],
        "method": prov["method"], "num_heads": net.num_heads, "hidden_size": net.hidden_size,
        "head_order": [int(h) for h in prov["head_order"].split(",")], "head_map": prov["head_map"],
        "centers": net.centers, "loss_range": net.loss_range, "loss_range_note": prov["loss_range"],
        "curves": curves_table(net),
    }
    emit(info, as_json, _print_text)

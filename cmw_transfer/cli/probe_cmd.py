"""``cmw-transfer probe``: CurveNet's probing stage, ERM under the cyclical schedule recording every loss curve."""

from __future__ import annotations

import json
import os

import click

from cmw_transfer.cli.options import log_option

# option name -> (type, help); defaults: the dataset's probe recipe, then ProbeConfig (trainer.config.resolve)
OPTIONS: dict[str, tuple[type, str]] = {
    "data_root": (str, "Root folder of the dataset's files."),
    "noise": (str, "Inject label noise, e.g. sym:0.4 (the same as the later metatrain/apply run)."),
    "imbalance": (float, "Long-tail imbalance factor to inject (the same as the later run)."),
    "meta_set": (str, "clean:N: hold out N clean samples per class first, as metatrain --meta-set clean:N does, so "
                      "the curves index metatrain's training set (unset: apply's training set)."),
    "model": (str, "Classifier: a timm model name or a built-in (small_cnn, cifar_resnet32)."),
    "epochs": (int, "Probe epochs T (the curves have T columns)."),
    "batch_size": (int, "Batch size per process."),
    "lr": (float, "Learning rate before the drop (SGD, Nesterov)."),
    "momentum": (float, "SGD momentum."),
    "weight_decay": (float, "Weight decay."),
    "drop_fraction": (float, "Where the cyclical phase starts, as a fraction of --epochs (paper: 120/300)."),
    "cycle_fraction": (float, "Half-period of the square wave, as a fraction of --epochs (paper: 15/300)."),
    "cycle_high": (float, "High lr of the square wave, as a multiple of --lr (paper: 0.1)."),
    "cycle_low": (float, "Low lr of the square wave, as a multiple of --lr (paper: 0.01)."),
    "seed": (int, "Seed of the run and of the injected bias (use the later run's seed)."),
    "workers": (int, "DataLoader worker processes."),
    "device": (str, "auto, cpu, cuda or cuda:N (torchrun: LOCAL_RANK)."),
}


def _options(command):
    for name, (kind, help_text) in reversed(OPTIONS.items()):
        command = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None, help=help_text)(command)
    return command


@click.command("probe")
@click.option("--dataset", required=True, metavar="SPEC", help="Training set: digits, cifar10, list:PATH, ...")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Probe directory: losses.npy (N x T float16), labels.npy, probe.json, checkpoint, metrics.")
@_options
@click.option("--resume", is_flag=True, help="Continue the probe in --out from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that already holds a probe.")
@log_option(default=None)
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="torch threads per process.  [default: OMP_NUM_THREADS, else CPUs / processes on this machine]")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
def probe_cmd(dataset: str, out: str, resume: bool, overwrite: bool, threads: int | None, quiet: bool,
              **options) -> None:
    """Train plainly under CurveNet's cyclical lr and record each sample's loss every epoch.

    The curves feed metatrain --method curvenet --curves OUT, or apply --weights CURVENET --curves OUT. Under
    torchrun every rank writes its shard's rows. Prints the summary as one JSON object on stdout.
    """
    from cmw_transfer.runtime import configure_threads, local_world_size
    from cmw_transfer.trainer.config import resolve_probe
    from cmw_transfer.trainer.engine.launch import run_stage

    configure_threads(threads, local_world_size())  # per rank under torchrun
    summary = run_stage(resolve_probe({**options, "dataset": dataset, "out": out, "resume": resume,
                                       "overwrite": overwrite, "progress": not quiet}))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(summary, sort_keys=True))

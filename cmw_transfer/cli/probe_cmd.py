"""``cmw-transfer probe``: CurveNet's probing stage, ERM under the cyclical schedule recording every loss curve."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from cmw_transfer.cli import options as opt
from cmw_transfer.cli.options import log_option

# option name -> (type, help); defaults: the dataset's probe recipe, then ProbeConfig (trainer.config.resolve)
OPTIONS: dict[str, tuple[Any, str]] = {
    "data_root": (str, "Root folder of the dataset's files."),
    "noise": (str, "Inject label noise, e.g. sym:0.4 (the same as the later metatrain/apply run)."),
    "imbalance": (opt.IMBALANCE, "Long-tail imbalance factor to inject (the same as the later run)."),
    "meta_set": (str, "clean:N: hold out N clean samples per class first, as metatrain --meta-set clean:N does, so "
                      "the curves index metatrain's training set (unset: apply's training set)."),
    "model": (str, "Classifier: a timm model name or a built-in (small_cnn, cifar_resnet32)."),
    "epochs": (opt.bounded_int(2, opt.MAX_EPOCHS), "Probe epochs T (the curves have T columns)."),
    "batch_size": (opt.BATCH, "Batch size per process."),
    "lr": (opt.LR, "Learning rate before the drop (SGD, Nesterov)."),
    "momentum": (opt.UNIT_OPEN, "SGD momentum."),
    "weight_decay": (opt.WEIGHT_DECAY, "Weight decay."),
    "drop_fraction": (opt.UNIT_OPEN, "Where the cyclical phase starts, as a fraction of --epochs (paper: 120/300)."),
    "cycle_fraction": (opt.FRACTION, "Half-period of the square wave, as a fraction of --epochs (paper: 15/300)."),
    "cycle_high": (opt.POSITIVE, "High lr of the square wave, as a multiple of --lr (paper: 0.1)."),
    "cycle_low": (opt.POSITIVE, "Low lr of the square wave, as a multiple of --lr (paper: 0.01)."),
    "seed": (opt.SEED, "Seed of the run and of the injected bias (use the later run's seed)."),
    "workers": (opt.WORKERS, "DataLoader worker processes."),
    "device": (opt.DEVICE, "auto, cpu, cuda or cuda:N (torchrun: LOCAL_RANK)."),
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
@click.option("--threads", type=opt.THREADS, default=None,
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

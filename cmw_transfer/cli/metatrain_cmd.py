"""``cmw-transfer metatrain``: learn a weighting net on a biased source, write the artifact."""

from __future__ import annotations

import json
from typing import Any

import click

from cmw_transfer.cli import options as opt
from cmw_transfer.trainer.config import METHODS, resolve_metatrain

# option name -> (type, help); defaults: the source's recipe, then MetaTrainConfig (trainer.config.resolve)
OPTIONS: dict[str, tuple[Any, str]] = {
    "data_dir": (str, "Root folder of the source dataset's files (fashion-mnist: --data-dir, then CMW_DATA_DIR, "
                 "then FashionMNIST/raw under either, then /usr/share/datasets/fashion-mnist)."),
    "noise": (str, "Extra noise steps, e.g. sym:0.4+asym:0.2 or pmd1:0.35+asym:0.3."),
    "imbalance": (opt.IMBALANCE, "Long-tail imbalance factor IF (n_max / n_min)."),
    "method": (click.Choice((*METHODS, "curvenet")), "cmwnet (K families), mwnet (K=1), cmwnet-sl (soft labels), "
               "curvenet (loss curves of a probe: --curves DIR) or advisor (MFRW/MES advisor network: outputs the "
               "trained classifier, not a transferable net)."),
    "advisor": (str, "--method advisor: mfrw, mes or mfrw,mes (default both)."),
    "advisor_rho": (opt.FRACTION, "--method advisor: Bernoulli rho of MES's beta (default 0.9)."),
    "families": (opt.FAMILIES, "Number of class-size families K (heads)."),
    "model": (str, "Classifier: a timm model name or a built-in (small_cnn, cifar_resnet32, cifar_resnet20)."),
    "epochs": (opt.EPOCHS, "Training epochs."),
    "batch_size": (opt.BATCH, "Training batch size."),
    "lr": (opt.LR, "Classifier learning rate (SGD)."),
    "momentum": (opt.UNIT_OPEN, "Classifier SGD momentum."),
    "weight_decay": (opt.WEIGHT_DECAY, "Classifier weight decay."),
    "sched": (str, "timm scheduler name (cosine, step, multistep, constant, ...)."),
    "meta_lr": (opt.LR, "Weighting-net learning rate (Adam)."),
    "meta_weight_decay": (opt.WEIGHT_DECAY, "Weighting-net weight decay."),
    "meta_interval": (opt.EPOCHS, "A meta step every k iterations."),
    "meta_batch_size": (opt.BATCH, "Meta batch size."),
    "meta_set": (str, "clean:N, lowest-loss:N or gmm."),
    "meta_grad": (str, "exact, skip:N (SLMO: bottom N stages cut) or famus (learned layer gates)."),
    "normalization": (click.Choice(["batch", "sum", "none"]), "Weight normalisation: w/B (default), w/sum(w), none."),
    "actual_step": (click.Choice(["reuse", "updated"]), "Real step with the net before (reuse, one backward "
                    "fewer) or after (updated, the paper's order) its meta update."),
    "warmup_epochs": (opt.WARMUP, "Plain cross-entropy epochs before meta-learning starts (the paper's warm-up, "
                      "not timm's lr warm-up)."),
    "hidden_size": (opt.HIDDEN, "Hidden units of the weighting net."),
    "ema_decay": (opt.UNIT_OPEN, "EMA teacher decay (lowest-loss meta sets, soft labels)."),
    "mixup_alpha": (opt.NON_NEGATIVE, "Mixup Beta(a, a) for cmwnet-sl (0 disables)."),
    "seed": (opt.SEED, "Random seed."),
    "device": (opt.DEVICE, "auto, cpu, cuda or cuda:N."),
    "workers": (opt.WORKERS, "DataLoader worker processes."),
    "eval_dataset": (str, "Test set of the classifier (required for list:/folder: sources, which have none)."),
}
# --method curvenet only (docs/curvenet.md)
CURVENET_OPTIONS: dict[str, tuple[Any, str]] = {
    "curves": (str, "curvenet: the probe directory (cmw-transfer probe ... --meta-set clean:N --out DIR)."),
    "curvenet_mode": (click.Choice(["faithful", "transferable"]), "curvenet: faithful (label embedding, the "
                      "probe's length; not transferable) or transferable (resampled curve, class-size families)."),
    "curve_skip": (opt.WARMUP, "curvenet: drop the first S probe epochs (paper: 5)."),
    "curve_length": (opt.EPOCHS, "curvenet, transferable: resample the curve to this many points."),
    "embed_dim": (opt.HIDDEN, "curvenet: width P of the curve feature and the class embedding (paper: 64)."),
    "curvenet_factor": (opt.POSITIVE, "curvenet: w = factor * sigmoid + bias (paper CIFAR-10: 1)."),
    "curvenet_bias": (opt.NON_NEGATIVE, "curvenet: w = factor * sigmoid + bias (paper CIFAR-10: 0.02)."),
    "meta_stop_epoch": (opt.EPOCHS, "curvenet: meta updates in epochs 1..N only, then the net is frozen "
                        "(default: the last epoch before the first lr decay)."),
}


def _apply_options(command):
    for name, (kind, help_text) in reversed({**OPTIONS, **CURVENET_OPTIONS}.items()):
        command = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None, help=help_text)(command)
    return command


@click.command("metatrain")
@click.option("--src", required=True, help="Biased source: digits-pmd, fashion-mnist-pmd, cifar10-pmd, or any dataset "
                                          "spec.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory (artifact).")
@_apply_options
@click.option("--mirror-optimizer", is_flag=True, help="Virtual step with the real momentum and weight decay.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (same --epochs).")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that already holds a meta-train run.")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="Settings from a JSON (or, with PyYAML, YAML) file, e.g. a run's run.json; options given on the "
                   "command line override it.")
@opt.log_option(default=None)
@click.option("--threads", type=opt.THREADS, default=None,
              help="torch threads.  [default: OMP_NUM_THREADS, else the CPUs of this process]")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object (the only output "
                                                      "on stdout).")
def metatrain_cmd(src: str, out: str, mirror_optimizer: bool, resume: bool, overwrite: bool, config_file: str | None,
                  threads: int | None, quiet: bool, as_json: bool, **options) -> None:
    """Meta-train a CMW-Net / MW-Net / CMW-Net-SL weighting net; defaults follow the source's recipe.

    --method advisor trains an advisor network (MFRW / MES) instead: its output is the trained classifier
    (classifier.safetensors with a model card), since the advisor is tied to the backbone's feature size and the
    label set and is discarded at test time; the advisor itself is kept in the checkpoint for --resume only.

    Prints a one-line result on stdout (--json: the summary as one JSON object); per-epoch lines, warnings and
    the progress bar go to stderr. Epochs count from 1, as in apply.
    """
    from cmw_transfer.runtime import configure_threads
    from cmw_transfer.trainer.engine.launch import run_stage

    configure_threads(threads, 1)  # one process
    ctx = click.get_current_context()
    result = run_stage(resolve_metatrain(
        {**options, "src": src, "out": out, "resume": resume, "overwrite": overwrite, "progress": not quiet,
         "mirror_optimizer": mirror_optimizer or None}, config_file,
        check_file=lambda values: opt.check_file_values(values, ctx, str(config_file))))
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    final = result.get("final") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items()) if isinstance(v, float) and k != "seconds")
    click.echo(f"done: {result['out']}: epoch {final.get('epoch', '-')}" + (f", {shown}" if shown else ""))

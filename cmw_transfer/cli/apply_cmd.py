"""``cmw-transfer apply``: train a classifier on a target dataset with a frozen weighting net (or plain ERM).

Multi-GPU / multi-node runs go through torchrun, e.g. ``torchrun --nproc_per_node 8 -m cmw_transfer apply ...``;
``--nproc N`` is the single-node shortcut that re-launches this same command under torchrun.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from cmw_transfer.cli.launch import run_under_torchrun
from cmw_transfer.cli.options import (
    BATCH,
    CLASS_FLOOR,
    CLASS_LIST,
    DEVICE,
    EPOCHS,
    FAMILIES,
    FRACTION,
    IMBALANCE,
    IMG_SIZE,
    LR,
    MILESTONES,
    NON_NEGATIVE,
    NPROC,
    POSITIVE,
    SEED,
    THREADS,
    UNIT_OPEN,
    WARMUP,
    WARMUP_AUTO,
    WEIGHT_DECAY,
    WORKERS,
    check_file_values,
    log_option,
)
from cmw_transfer.errors import UserError

if TYPE_CHECKING:
    from cmw_transfer.trainer.config import ApplyConfig


def _relaunch_argv(ctx: click.Context, nproc: int) -> list[str]:
    """This command, rebuilt from the parsed options minus ``--nproc``, under ``python -m torch.distributed.run``."""
    args: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name == "nproc":
            continue
        value = ctx.params.get(param.name)
        if param.is_flag:
            if value is None:  # a tri-state flag left at "auto"
                continue
            if value and param.opts:
                args.append(param.opts[0])
            elif not value and param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif param.multiple:
            for item in value or ():
                args += [param.opts[0], str(item)]
        elif isinstance(value, tuple):  # a comma-separated list: --log, spelt --loggers (see options.log_option)
            if value:
                args += [param.opts[-1], ",".join(map(str, value))]
        elif value is not None:
            args += [param.opts[0], str(value)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "cmw_transfer", "apply", *args]


def check_nproc(nproc: int, device: str) -> None:
    """``--nproc`` against this machine, before torchrun starts anything: one process per GPU on CUDA, one per
    CPU otherwise."""
    import torch

    from cmw_transfer.cli.options import machine_limit

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise UserError(f"--nproc {nproc}: only {gpus} CUDA device(s) visible here (one process per GPU)")
        return
    limit, why = machine_limit("processes")
    if nproc > limit:
        raise UserError(f"--nproc {nproc} is more than this machine can run: at most {limit} ({why})")


def typed_options(ctx: click.Context, options: dict[str, object]) -> frozenset[str]:
    """The options the user typed (not click defaults): they override ``--config``."""
    return frozenset(k for k in options
                     if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None))


def _preflight(cfg: ApplyConfig) -> None:
    """Every check that needs no data, once, before torchrun starts the workers (each would print the error,
    followed by torchrun's failure report)."""
    from cmw_transfer.artifact.load import load
    from cmw_transfer.dataset import resolve_source

    cfg.validate()
    resolve_source(cfg.dataset, cfg.noise, cfg.imbalance)
    for spec in (cfg.eval_dataset, cfg.open_dataset):
        if spec:
            resolve_source(spec)
    if cfg.weighting == "cmw" and cfg.weights:
        load(cfg.weights)  # a CMW-Net or a CurveNet


@click.command("apply")
@click.option("--weights", "weights", metavar="SPEC", default=None,
              help="Frozen weighting net: DIR, FILE.safetensors, hub:org/name[@rev] or pretrained:NAME "
                   "(required with --weighting cmw).")
@click.option("--curves", default=None, metavar="DIR",
              help="With a CurveNet --weights: the loss curves of this data, from cmw-transfer probe (same "
                   "--dataset/--noise/--imbalance/--seed, the net's probe schedule).")
@click.option("--dataset", required=True, metavar="SPEC", help="Target dataset: digits, fashion-mnist, cifar10, "
                                                                 "webvision-full, list:PATH, folder:PATH, ... (see "
                                                                 "cmw-transfer data).")
@click.option("--data-dir", "--data-root", "data_root", default=None, metavar="DIR",
              help="Dataset root folder (fashion-mnist: --data-dir, then CMW_DATA_DIR, then FashionMNIST/raw under "
                   "either, then /usr/share/datasets/fashion-mnist).")
@click.option("--noise", default=None, metavar="SPEC", help="Inject label noise, e.g. asym:0.4 or sym:0.4+asym:0.2.")
@click.option("--imbalance", type=IMBALANCE, default=None, help="Long-tail imbalance factor to inject (e.g. 10).")
@click.option("--out", required=True, metavar="DIR", help="Run directory (checkpoint, metrics, families, summary).")
@click.option("--model", default="resnet18",
              help="Backbone: any timm model name, or small_cnn / lenet / cifar_resnet32.  [default: resnet18; lenet "
                   "for fashion-mnist, mnist, kmnist]")
@click.option("--img-size", type=IMG_SIZE, default=None, help="Resize to this input size with timm's transforms "
                                                           "(default: file datasets 224, in-memory sets as stored).")
@click.option("--pretrained", is_flag=True, help="Start from timm's pretrained weights (Hugging Face cache; "
                                                  "HF_HUB_OFFLINE=1 works with a populated cache).")
@click.option("--initial-checkpoint", default=None, metavar="PATH",
              help="Initialise the model from this state dict (.safetensors or torch.save, loaded weights-only).")
@click.option("--epochs", type=EPOCHS, default=30, help="[default: 30; 15 for fashion-mnist, mnist, kmnist]")
@click.option("--batch-size", type=BATCH, default=128, show_default=True, help="Per process (global = N x this).")
@click.option("--lr", type=LR, default=0.1, help="[default: 0.1; 0.05 for fashion-mnist, mnist, kmnist]")
@click.option("--opt", default="sgd", show_default=True, help="timm optimizer name (sgd is Nesterov momentum).")
@click.option("--momentum", type=UNIT_OPEN, default=0.9, show_default=True)
@click.option("--weight-decay", type=WEIGHT_DECAY, default=5e-4, show_default=True)
@click.option("--sched", default="cosine", show_default=True,
              help="timm scheduler: cosine, step, multistep, tanh, poly, constant, wsd, rsqrt or none.")
@click.option("--decay-milestones", type=MILESTONES, default=None, metavar="E1,E2",
              help="--sched multistep: epochs where the lr is multiplied by 0.1 (default: 50% and 75% of the run).")
@click.option("--warmup-lr-epochs", type=WARMUP, default=0, show_default=True, help="Linear lr warm-up (timm).")
@click.option("--warmup-epochs", type=WARMUP_AUTO, default="auto", show_default=True,
              help="Plain cross-entropy epochs before the net is applied (the paper's warm-up; timm's lr warm-up "
                   "is --warmup-lr-epochs). auto: until the net would give the target's samples half the weight it "
                   "gives a typical source sample, at most a quarter of the run, never in epoch 1.")
@click.option("--min-class-weight", type=CLASS_FLOOR, default=0.5, show_default=True,
              help="Class floor: in every batch a class's mean weight is lifted to at least this fraction of the "
                   "batch's mean weight (order inside the class kept); 0 disables it.")
@click.option("--weighting", type=click.Choice(["cmw", "none", "focal", "class-balanced", "eql"]), default="cmw",
              show_default=True, help="cmw: frozen net; none: the plain ERM baseline through the same pipeline; "
                                      "focal / class-balanced: fixed-weighting baselines; eql: equalization loss.")
@click.option("--eql-threshold", type=FRACTION, default=None,
              help="--weighting eql: classes below this training frequency are rare (default 1/(2C)).")
@click.option("--eql-rho", type=FRACTION, default=0.9, show_default=True,
              help="--weighting eql: P(beta = 1), beta drawn per sample and class.")
@click.option("--focal-gamma", type=NON_NEGATIVE, default=2.0, show_default=True,
              help="--weighting focal: (1-p_t)^gamma.")
@click.option("--cb-beta", type=UNIT_OPEN, default=0.999, show_default=True,
              help="--weighting class-balanced: effective-number beta.")
@click.option("--normalization", type=click.Choice(["auto", "batch", "sum", "none"]), default="auto", show_default=True,
              help="Per-sample coefficients: w/B (CMW-Net's meta-training form), w/sum(w), or w. auto: w/sum(w) for "
                   "a frozen net (it re-weights samples; --lr keeps its meaning), w/B for the fixed baselines.")
@click.option("--trust-check", type=click.Choice(["fallback", "warn", "off"]), default="fallback", show_default=True,
              help="At the end of the CE warm-up, judge whether the frozen net suits this target (long tail, classes "
                   "it would starve); fallback: keep plain CE for the rest of the run, warn: weight anyway.")
@click.option("--families", type=FAMILIES, default=None, help="Expected number of class-size families (must equal the "
                                                           "net's K; default: the net's K).")
@click.option("--soft-labels", is_flag=True, help="CMW-Net-SL: EMA teacher, pseudo-labels and mixup (WebVision form).")
@click.option("--mixup-alpha", type=NON_NEGATIVE, default=1.0, show_default=True, help="Beta(a, a) of the SL mixup.")
@click.option("--teacher-decay", type=UNIT_OPEN, default=0.997, show_default=True, help="EMA decay of the SL teacher.")
@click.option("--amp", is_flag=True, help="Mixed precision (float16 + grad scaling on CUDA, bfloat16 on CPU).")
@click.option("--workers", type=WORKERS, default=None,
              help="DataLoader workers per process.  [default: min(4, CPUs per process - 1)]")
@click.option("--threads", type=THREADS, default=None,
              help="torch threads per process.  [default: OMP_NUM_THREADS, else CPUs / processes on this machine]")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--strict", is_flag=True, help="Fail on an unreadable image instead of skipping it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that already holds a run.")
@click.option("--eval-every", type=EPOCHS, default=1, show_default=True, help="Evaluate every N epochs (and the last).")
@click.option("--eval-dataset", default=None, metavar="SPEC",
              help="Test set instead of the dataset's own test/val split (required for list:/folder: datasets).")
@click.option("--extra-eval", multiple=True, metavar="NAME=SPEC",
              help="Further evaluation set, e.g. ilsvrc12=list:/data/imagenet/val.txt (repeatable).")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (torchrun: LOCAL_RANK).")
@click.option("--nproc", type=NPROC, default=1, show_default=True,
              help="Launch N processes on this machine through torchrun (DDP: nccl on GPU, gloo on CPU).")
@click.option("--progress/--no-progress", default=True, help="Progress bar with images/s (rank 0 only).")
@click.option("--trainer", type=click.Choice(["erm", "oltr"]), default="erm", show_default=True,
              help="erm: one classifier (the apply stage); oltr: two-stage OLTR (docs/oltr.md).")
@click.option("--oltr-stage1-epochs", type=EPOCHS, default=None,
              help="OLTR stage 1 (backbone + linear classifier) epochs.  [default: --epochs]")
@click.option("--oltr-stage2-epochs", type=EPOCHS, default=None,
              help="OLTR stage 2 (meta-embedding) epochs.  [default: --epochs]")
@click.option("--oltr-backbone-lr-mult", type=NON_NEGATIVE, default=0.1, show_default=True,
              help="Stage-2 backbone lr = --lr x this (the head trains at --lr).")
@click.option("--oltr-sampler", type=click.Choice(["class-aware", "uniform"]), default="class-aware",
              show_default=True, help="Stage-2 batches: class-aware (official OLTR) or uniform over samples.")
@click.option("--samples-per-class", type=BATCH, default=4, show_default=True,
              help="Class-aware sampling: consecutive samples drawn from one class.")
@click.option("--dcl-weight", type=NON_NEGATIVE, default=0.01, show_default=True,
              help="Weight of the discriminative centroid loss in stage 2.")
@click.option("--dcl-margin", type=NON_NEGATIVE, default=10.0, show_default=True,
              help="Centroid loss push margin (mean squared distance to the other centroids).")
@click.option("--dcl-push-weight", type=NON_NEGATIVE, default=0.01, show_default=True,
              help="Weight of the push term inside the centroid loss.")
@click.option("--cosine-scale", type=POSITIVE, default=16.0, show_default=True, help="Cosine-norm classifier scale.")
@click.option("--reachability-scale", type=POSITIVE, default=10.0, show_default=True,
              help="Reachability = this / distance to the nearest class centroid.")
@click.option("--modulated-attention/--no-modulated-attention", default=None,
              help="Stage-2 modulated attention on the feature map.  [default: on for CNN feature maps]")
@click.option("--recompute-centroids", is_flag=True, help="Recompute the OLTR memory at every stage-2 epoch.")
@click.option("--open-dataset", default=None, metavar="SPEC",
              help="Open-set samples (every one unknown); imagenet-lt reads ImageNet_LT_open.txt, which is also "
                   "used by default when present.")
@click.option("--open-classes", type=CLASS_LIST, default=None, metavar="LIST",
              help="Hold these classes out of training (e.g. 9 or 7,8,9); their test samples are the open set.")
@click.option("--open-threshold", type=POSITIVE, default=None,
              help="Reject as unknown below this reachability.  [default: accept --open-accept of known test]")
@click.option("--open-accept", type=FRACTION, default=0.95, show_default=True,
              help="Without --open-threshold: the fraction of known test samples the threshold accepts.")
@log_option(default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object.")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="Settings from a JSON (or, with PyYAML, YAML) file, e.g. a run's config.json; options given on "
                   "the command line override it.")
@click.pass_context
def apply_cmd(ctx: click.Context, nproc: int, as_json: bool, config_file: str | None, **options: object) -> None:
    """Train --model on --dataset with the frozen net from --weights (or plain ERM with --weighting none).

    --trainer oltr trains OLTR (two stages) with the same weighting; --open-classes / --open-dataset add the
    open-set evaluation (reachability rejection, F-measure) to either trainer.

    Writes config.json, families.json, metrics.jsonl (one line per epoch), checkpoint.pt (every epoch),
    summary.json, the final and best classifier (safetensors) and training.png into --out, all atomically; --log
    adds metrics.csv and/or TensorBoard event files.
    """
    from cmw_transfer.runtime import configure_threads, default_workers, local_world_size
    from cmw_transfer.trainer.config import resolve_apply
    from cmw_transfer.trainer.engine.launch import run_stage

    configure_threads(options.pop("threads"), local_world_size())  # type: ignore[arg-type]  (per rank)
    options["extra_eval"] = tuple(options["extra_eval"])  # type: ignore[arg-type]
    for name in ("decay_milestones", "open_classes", "log"):  # None: not given
        options[name] = options[name] or ()
    if not config_file and options.get("workers") is None:
        options["workers"] = default_workers(local_world_size())
    cfg = resolve_apply(options, config_file, typed_options(ctx, options),
                        check_file=lambda values: check_file_values(values, ctx, str(config_file)))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        check_nproc(nproc, cfg.device)
        _preflight(cfg)
        raise SystemExit(run_under_torchrun(_relaunch_argv(ctx, nproc)))
    summary = run_stage(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    final = summary["final"]
    line = ", ".join(f"{k} {v:.2f}" for k, v in sorted(final.items()) if isinstance(v, float))
    click.echo(f"done: {summary['out']}: {line}")

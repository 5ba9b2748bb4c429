"""CurveNet on the embedded digits: long tail + noise, and a noise-free long tail; 3 seeds (a benchmark, not a test).

Methods (one classifier, ``--model``, same epochs / batch / lr; clean test top-1 at the last epoch):

    erm                plain cross-entropy                              (apply --weighting none)
    erm-multistep      the same under CurveNet's classifier schedule    (... --sched multistep, x0.1 at 40%
                                                                          and 50% of the run, no CE warm-up)
    class-balanced     fixed per-class weight, effective number         (apply --weighting class-balanced)
    mwnet              MW-Net meta-trained on this data                 (metatrain --method mwnet)
    cmwnet             CMW-Net meta-trained on this data                (metatrain --method cmwnet)
    cmwnet-sum         the same with the weights normalised by their    (... --normalization sum)
                       sum in the batch, as CurveNet here
    curvenet           CurveNet, faithful, on this data's probe         (probe --meta-set clean:10; metatrain
                                                                         --method curvenet)
    curvenet-transfer  a transferable CurveNet meta-trained on another  (probe; apply --weights NET --curves DIR)
                       bias (``--source``), applied frozen to this
                       data's probe

The meta-trained methods hold out 10 clean samples per class (before the bias) as their meta set. Besides top-1
it reports, for the methods that weight samples, the AUC of the weights separating clean from noisy samples
*within the tail classes* (the smaller half of the classes by observed count; 0.5 = no separation, > 0.5 =
clean samples weigh more), from the weights the classifier trains with in the last epoch; and the probe's cost
as a ratio of its wall time to one ERM run of the same length.

    OMP_NUM_THREADS=1 python scripts/study_curvenet.py                    # ~10 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 python scripts/study_curvenet.py --seeds 0 --settings lt+noise   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_table import cell

from cmw_transfer.artifact.curvenet import CurveNet
from cmw_transfer.dataset import create_dataset
from cmw_transfer.metrics import clean_noisy_auc
from cmw_transfer.trainer.config import DECAY_FRACTIONS, ApplyConfig, CurveNetConfig, MetaTrainConfig, ProbeConfig
from cmw_transfer.trainer.engine.launch import launch, run_stage
from cmw_transfer.trainer.engine.loop import register_callback, remove_callback
from cmw_transfer.weighting.curves import curve_criterion

SETTINGS = {  # name -> (noise, imbalance)
    "lt+noise": ("sym:0.4", 10.0),
    "lt": (None, 20.0),
}
SOURCE = ("asym:0.3", 5.0)  # the bias the transferred CurveNet is meta-trained on
METHODS = ("erm", "erm-multistep", "class-balanced", "mwnet", "cmwnet", "cmwnet-sum", "curvenet", "curvenet-transfer")


class LastWeights:
    """Engine callback: the per-sample weights of a meta-train stage's last epoch."""

    def __init__(self) -> None:
        self.weights: np.ndarray | None = None

    def on_epoch_end(self, stage: Any, epoch: int, row: dict) -> None:
        if hasattr(stage, "last_weight"):
            self.weights = np.array(stage.last_weight, copy=True)


def tail_auc(weights: np.ndarray | None, ds: Any) -> float | None:
    """Clean-vs-noisy AUC of the weights within the smaller half of the classes (None without noise)."""
    if weights is None or ds.clean_targets is None:
        return None
    counts = ds.class_counts()
    tail = np.isin(ds.targets, np.argsort(counts, kind="stable")[: len(counts) // 2])
    keep = tail & np.isfinite(weights)
    clean = (ds.targets == ds.clean_targets)[keep]
    if clean.all() or not clean.any():
        return None
    return float(clean_noisy_auc(weights[keep], clean))


def common(args: Any, noise: str | None, imbalance: float | None, seed: int) -> dict[str, Any]:
    return dict(noise=noise, imbalance=imbalance, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, seed=seed, device="cpu")


def probe(args: Any, out: Path, noise: str | None, imbalance: float | None, seed: int, meta_layout: bool
          ) -> tuple[Path, float]:
    t0 = time.perf_counter()
    run_stage(ProbeConfig(dataset="digits", out=str(out), noise=noise, imbalance=imbalance, seed=seed,
                          meta_set="clean:10" if meta_layout else None, model=args.model, epochs=args.probe_epochs,
                          batch_size=args.batch_size, lr=args.lr, workers=0, device="cpu", progress=False))
    return out, time.perf_counter() - t0


def curvenet_config(args: Any, out: Path, curves: Path, mode: str, noise: str | None, imbalance: float | None,
                    seed: int) -> CurveNetConfig:
    return CurveNetConfig(src="digits", out=str(out), curves=str(curves), curvenet_mode=mode, meta_set="clean:10",
                          meta_batch_size=100, sched="multistep", warmup_epochs=0, meta_lr=args.curvenet_meta_lr,
                          normalization=args.curvenet_normalization,
                          curve_skip=args.curve_skip, curve_length=args.curve_length,
                          **common(args, noise, imbalance, seed))


def run_method(method: str, noise: str | None, imbalance: float | None, seed: int, args: Any, work: Path,
               source_net: Path | None) -> dict[str, Any]:
    """{top1, auc, seconds (, probe_seconds)} of one method on one biased set."""
    out = work / f"{method}-{noise}-{imbalance}-{seed}"
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    if method in ("mwnet", "cmwnet", "cmwnet-sum"):
        cfg = MetaTrainConfig(src="digits", out=str(out), method=method.split("-")[0], meta_set="clean:10",
                              meta_batch_size=100, warmup_epochs=args.warmup_epochs,
                              normalization="sum" if method.endswith("-sum") else "batch",
                              **common(args, noise, imbalance, seed))
        spy = register_callback(LastWeights())
        try:
            trainer = launch(replace(cfg, progress=False))
            summary = trainer.run()
        finally:
            remove_callback(spy)
        result.update(top1=summary["final"]["test_top1"], auc=tail_auc(spy.weights, trainer.stage.data.train))
    elif method == "curvenet":
        curves, probe_s = probe(args, work / f"probe-meta-{noise}-{imbalance}-{seed}", noise, imbalance, seed, True)
        trainer = launch(replace(curvenet_config(args, out, curves, "faithful", noise, imbalance, seed),
                                 progress=False))
        summary = trainer.run()
        result.update(top1=summary["final"]["test_top1"], auc=tail_auc(trainer.stage.bank, trainer.stage.data.train),
                      probe_seconds=probe_s)
    else:
        curves = None
        if method == "curvenet-transfer":
            curves, probe_s = probe(args, work / f"probe-apply-{noise}-{imbalance}-{seed}", noise, imbalance, seed,
                                    False)
            result["probe_seconds"] = probe_s
        weighting = {"erm": "none", "erm-multistep": "none", "class-balanced": "class-balanced",
                     "curvenet-transfer": "cmw"}[method]
        multistep = method == "erm-multistep"
        cfg = ApplyConfig(dataset="digits", out=str(out), weighting=weighting, workers=0, progress=False,
                          weights=str(source_net) if curves else None, curves=str(curves) if curves else None,
                          warmup_epochs=0 if multistep or curves else args.warmup_epochs, eval_every=args.epochs,
                          sched="multistep" if multistep else "cosine",
                          decay_milestones=tuple(int(f * args.epochs) for f in DECAY_FRACTIONS) if multistep else (),
                          normalization=args.curvenet_normalization if curves else "batch",
                          **common(args, noise, imbalance, seed))
        t_train = time.perf_counter()
        summary = run_stage(cfg)
        result["train_seconds"] = time.perf_counter() - t_train
        result["top1"] = summary["final"]["test_top1"]
        if curves is not None:
            ds = create_dataset("digits", None, "train", seed=seed, noise=noise, imbalance=imbalance)
            table = curve_criterion(CurveNet.from_pretrained(source_net), str(curves), ds, "batch", "").table
            result["auc"] = tail_auc(table.numpy(), ds)
    result["seconds"] = time.perf_counter() - t0
    return result


def source_curvenet(args: Any, work: Path, seed: int) -> Path:
    """The transferable CurveNet of a seed, meta-trained on the ``SOURCE`` bias (its own probe)."""
    noise, imbalance = SOURCE
    curves, _ = probe(args, work / f"probe-source-{seed}", noise, imbalance, seed, True)
    out = work / f"source-curvenet-{seed}"
    run_stage(replace(curvenet_config(args, out, curves, "transferable", noise, imbalance, seed), progress=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--warmup-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--curvenet-meta-lr", type=float, default=1e-3)
    parser.add_argument("--curvenet-normalization", default="sum")
    parser.add_argument("--curve-skip", type=int, default=5)
    parser.add_argument("--curve-length", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/study_curvenet"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings, methods = args.settings.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {m: [] for m in methods} for s in settings}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in seeds:
            source = source_curvenet(args, work, seed) if "curvenet-transfer" in methods else None
            for setting in settings:
                noise, imbalance = SETTINGS[setting]
                for method in methods:
                    res = run_method(method, noise, imbalance, seed, args, work, source)
                    results[setting][method].append(res)
                    auc = res.get("auc")
                    print(f"{setting:<10}{method:<19}seed {seed}: top1 {res['top1']:.2f}"
                          f"{'' if auc is None else f', tail AUC {auc:.3f}'} ({res['seconds']:.0f} s)",
                          file=sys.stderr)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                     "results": results, "seconds": elapsed}, indent=2))
    print(f"digits, {args.model}, {args.epochs} epochs (probe {args.probe_epochs}), batch {args.batch_size}, seeds "
          f"{seeds}; transfer source bias {SOURCE[0]}, IF {SOURCE[1]:g} ({elapsed:.0f} s)\n")
    print("clean test top-1 (%), mean ± std\n")
    print("| setting | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for setting in settings:
        noise, imbalance = SETTINGS[setting]
        label = f"{setting} ({noise or 'no noise'}, IF {imbalance:g})"
        print(f"| {label} | " + " | ".join(cell([r["top1"] for r in results[setting][m]]) for m in methods) + " |")
    weighted = [m for m in methods if m in ("mwnet", "cmwnet", "cmwnet-sum", "curvenet", "curvenet-transfer")]
    noisy = [s for s in settings if SETTINGS[s][0]]
    if weighted and noisy:
        print("\nclean-vs-noisy AUC of the weights within the tail classes (0.5: no separation)\n")
        print("| setting | " + " | ".join(weighted) + " |")
        print("|---|" + "---|" * len(weighted))
        for setting in noisy:
            print(f"| {setting} | " + " | ".join(cell([r.get("auc") for r in results[setting][m]], 3)
                                                 for m in weighted) + " |")
    ratios = [r["probe_seconds"] / e["train_seconds"] for s in settings
              for r, e in zip(results[s].get("curvenet-transfer", []), results[s].get("erm", []))]
    if ratios:
        print(f"\nprobe cost: {statistics.median(ratios):.2f} x one ERM run of {args.epochs} epochs (median of "
              f"{len(ratios)}; probe {args.probe_epochs} epochs, same model and batch)")


if __name__ == "__main__":
    main()

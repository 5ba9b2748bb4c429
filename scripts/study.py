"""Learning-quality study on the embedded digits: fixed vs learned vs transferred weighting, 3 seeds.

Every method trains the same classifier (``--model``, default the built-in ``small_cnn``) for the same budget
(epochs, batch, lr, optimizer, cosine schedule, CE warm-up) on the same biased training set, and is scored on
the clean test split (final epoch, no early stopping):

    erm             plain cross-entropy                           (apply --weighting none)
    focal           fixed weight (1 - p_t)^2 of the loss          (apply --weighting focal)
    class-balanced  fixed per-class weight, effective number      (apply --weighting class-balanced)
    mwnet           MW-Net meta-trained on this data              (metatrain --method mwnet)
    cmwnet          CMW-Net meta-trained on this data             (metatrain --method cmwnet)
    transfer        the shipped net meta-trained on digits-pmd,   (apply --weights pretrained:cmwnet-digits-pmd)
                    a *different* bias, applied frozen

The meta-trained methods hold out 10 clean samples per class (before the bias) as their meta set; the others
train on the full biased set. Writes ``study.json`` and prints a markdown table (mean ± std over seeds).

    python scripts/study.py                         # ~9 minutes on 2 CPU cores
    python scripts/study.py --seeds 0 --settings asym   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # exact, and faster than 2 contended threads on small models

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_table import print_table

from cmw_transfer.trainer.apply import ApplyConfig, run_apply
from cmw_transfer.trainer.metatrain import MetaTrainConfig, MetaTrainer

SETTINGS = {  # name -> (noise, imbalance)
    "asym": ("asym:0.4", None),
    "pmd": ("pmd1:0.35", None),
    "long-tail": (None, 10.0),
    "asym+long-tail": ("asym:0.3", 5.0),
    "sym+long-tail": ("sym:0.4", 5.0),
}
METHODS = ("erm", "focal", "class-balanced", "mwnet", "cmwnet", "transfer")
TRANSFER_NET = "pretrained:cmwnet-digits-pmd"


def run_one(method: str, noise: str | None, imbalance: float | None, seed: int, args, workdir: Path) -> float:
    out = workdir / f"{method}-{noise}-{imbalance}-{seed}"
    common = dict(noise=noise, imbalance=imbalance, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, warmup_epochs=args.warmup_epochs, seed=seed, device="cpu")
    if method in ("mwnet", "cmwnet"):
        cfg = MetaTrainConfig(src="digits", out=str(out), method=method, meta_set="clean:10", meta_batch_size=100,
                              **common)
        return float(MetaTrainer(cfg, progress=False).run()["final"]["test_top1"])
    weighting = {"erm": "none", "focal": "focal", "class-balanced": "class-balanced", "transfer": "cmw"}[method]
    cfg = ApplyConfig(dataset="digits", out=str(out), weighting=weighting,
                      weights=TRANSFER_NET if method == "transfer" else None, workers=0, progress=False,
                      overwrite=True, **common)
    return float(run_apply(cfg)["final"]["test_top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings = args.settings.split(",")
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in methods} for s in settings}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            noise, imbalance = SETTINGS[setting]
            for method in methods:
                for seed in seeds:
                    acc = run_one(method, noise, imbalance, seed, args, Path(tmp))
                    results[setting][method].append(acc)
                    print(f"{setting:<16}{method:<16}seed {seed}: {acc:.2f}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                     "results": results}, indent=2))
    print(f"digits, {args.model}, {args.epochs} epochs, seeds {seeds}; clean test top-1 (%), mean ± std "
          f"({time.perf_counter() - start:.0f} s)\n")
    def label(setting: str) -> str:
        noise, imbalance = SETTINGS[setting]
        return f"{setting} ({noise or 'no noise'}{f', IF {imbalance:g}' if imbalance else ''})"

    print_table(results, settings, methods, label)


if __name__ == "__main__":
    main()

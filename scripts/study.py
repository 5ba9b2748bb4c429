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

``--matrix`` is the safe-transfer evidence: 14 cells (noise none / sym / asym / PMD x imbalance factor 1, 10, 50),
where the transferred nets run with ``apply``'s *default* weighting options (``--warmup-epochs auto``, the default
``--min-class-weight``), as a user would, while every other method keeps the study's fixed CE warm-up. Each
finished run is appended to ``--out/runs.jsonl``, so a restart skips what is done. Per cell it prints the
realised label-noise rate and checks the goal: transfer >= ERM - spread (spread: the larger of the two stds) and,
where the realised noise is >= 20%, transfer >= ERM + 3. ``cmw-transfer/floor=F`` is the transfer with
``--min-class-weight F``.

    python scripts/study.py                         # ~9 minutes on 2 CPU cores
    python scripts/study.py --seeds 0 --settings asym   # a quick look
    python scripts/study.py --matrix --out runs/matrix  # the evidence matrix (resumable)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # exact, and faster than 2 contended threads on small models

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_table import load_cache, print_table

from cmw_transfer.dataset import create_dataset
from cmw_transfer.trainer.config import ApplyConfig, MetaTrainConfig
from cmw_transfer.trainer.engine.launch import run_stage

SETTINGS = {  # name -> (noise, imbalance)
    "asym": ("asym:0.4", None),
    "pmd": ("pmd1:0.35", None),
    "long-tail": (None, 10.0),
    "asym+long-tail": ("asym:0.3", 5.0),
    "sym+long-tail": ("sym:0.4", 5.0),
}
METHODS = ("erm", "focal", "class-balanced", "mwnet", "cmwnet", "transfer")
TRANSFER_NET = "pretrained:cmwnet-digits-pmd"
# --matrix: noise x imbalance factor (None = balanced); the transfers run with apply's default weighting options
MATRIX = {f"{noise or 'clean'}, IF {imb or 1:g}": (noise, imb)
          for imb in (None, 10.0)
          for noise in (None, "sym:0.2", "sym:0.4", "asym:0.2", "asym:0.4", "pmd1:0.35")}
MATRIX.update({f"{noise or 'clean'}, IF 50": (noise, 50.0) for noise in (None, "sym:0.2")})
MATRIX_METHODS = ("erm", "class-balanced", "mwnet", "cmwnet", "cmw-transfer", "mw-transfer")
DEFAULT_TRANSFERS = {"cmw-transfer": "pretrained:cmwnet-digits-pmd", "mw-transfer": "pretrained:mwnet-digits-pmd"}
CACHE_NAME = "runs.jsonl"


def run_one(method: str, noise: str | None, imbalance: float | None, seed: int, args, workdir: Path) -> dict:
    """Train one method on one biased digits set; the final clean-test top-1 and what the run logged."""
    out = workdir / f"{method}-{noise}-{imbalance}-{seed}".replace("/", "_")
    common = dict(noise=noise, imbalance=imbalance, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, seed=seed, device="cpu")
    if method in ("mwnet", "cmwnet"):
        cfg = MetaTrainConfig(src="digits", out=str(out), method=method, meta_set="clean:10", meta_batch_size=100,
                              warmup_epochs=args.warmup_epochs, progress=False, **common)
        return {"top1": float(run_stage(cfg)["final"]["test_top1"])}
    net, _, floor = method.partition("/floor=")
    if net in DEFAULT_TRANSFERS:  # apply's default warm-up (auto) and, unless named, its default class floor
        cfg = ApplyConfig(dataset="digits", out=str(out), weights=DEFAULT_TRANSFERS[net], workers=0, progress=False,
                          overwrite=True, **({"min_class_weight": float(floor)} if floor else {}), **common)
    else:
        weighting = {"erm": "none", "focal": "focal", "class-balanced": "class-balanced", "transfer": "cmw"}[method]
        cfg = ApplyConfig(dataset="digits", out=str(out), weighting=weighting,
                          weights=TRANSFER_NET if method == "transfer" else None, workers=0, progress=False,
                          overwrite=True, warmup_epochs=args.warmup_epochs, **common)
    summary = run_stage(cfg)
    result = {"top1": float(summary["final"]["test_top1"])}
    if cfg.weighting == "cmw":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        weights = [r["mean_weight"] for r in rows if r.get("weighted") and r.get("mean_weight") is not None]
        result.update(warmup_start_epoch=summary.get("warmup_start_epoch"),
                      mean_weight=statistics.mean(weights) if weights else None,
                      min_class_mean_weight=rows[-1].get("min_class_mean_weight") if rows else None,
                      frac_outside_range=rows[-1].get("frac_outside_range") if rows else None,
                      worst_class=summary.get("worst_class"))
    return result


def realised_noise(noise: str | None, imbalance: float | None, seed: int) -> float:
    """Fraction of the (apply-side) training labels the bias changed."""
    if noise is None:
        return 0.0
    ds = create_dataset("digits", None, "train", seed=seed, noise=noise, imbalance=imbalance)
    return float(ds.noise_rate() or 0.0)


def run_key(method: str, setting: str, seed: int, args) -> str:
    return json.dumps([method, *MATRIX[setting], seed, args.model, args.epochs, args.batch_size, args.lr,
                       args.warmup_epochs])


def goal_checks(results: dict[str, dict[str, list[float]]], noise: dict[str, float], settings: list[str],
                transfers: list[str], details: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Per cell and transferred net: >= ERM - spread, and >= ERM + 3 where the realised noise is >= 20%; with
    what the transferred runs did (warm-up start epochs, mean applied weight, worst class's test top-1)."""
    lines = ["| cell | net | transfer - ERM | spread | not worse | +3 at >= 20% noise | warm-up start | mean weight | "
             "worst class top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        erm = results[setting].get("erm", [])
        for method in transfers:
            got = results[setting].get(method, [])
            if len(erm) < 2 or len(got) < 2:
                continue
            diff = statistics.mean(got) - statistics.mean(erm)
            spread = max(statistics.stdev(got), statistics.stdev(erm))
            plus3 = ("yes" if diff >= 3 else "**no**") if noise[setting] >= 0.2 else "n/a"
            runs = details.get((setting, method), [])
            starts = sorted({r.get("warmup_start_epoch") for r in runs if r.get("warmup_start_epoch")})
            weights = [r["mean_weight"] for r in runs if r.get("mean_weight") is not None]
            worst = [r["worst_class"]["top1"] for r in runs if r.get("worst_class")]
            lines.append(f"| {setting} | {method} | {diff:+.1f} | {spread:.1f} | "
                         f"{'yes' if diff >= -spread else '**no**'} | {plus3} | {', '.join(map(str, starts))} | "
                         f"{statistics.mean(weights) if weights else float('nan'):.2f} | "
                         f"{statistics.mean(worst) if worst else float('nan'):.1f} |")
    return lines


def run_matrix(args, settings: list[str], methods: list[str], seeds: list[int]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / CACHE_NAME
    done = load_cache(cache_path)
    start = time.perf_counter()
    noise = {s: statistics.mean(realised_noise(*MATRIX[s], seed) for seed in seeds) for s in settings}
    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in methods} for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            for method in methods:
                for seed in seeds:
                    key = run_key(method, setting, seed, args)
                    if key not in done:
                        t0 = time.perf_counter()
                        row = {"key": key, "setting": setting, "method": method, "seed": seed,
                               **run_one(method, *MATRIX[setting], seed, args, Path(tmp)),
                               "seconds": time.perf_counter() - t0}
                        with cache_path.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                        done[key] = row
                        print(f"{setting:<20}{method:<26}seed {seed}: {row['top1']:.2f} "
                              f"(warm-up start {row.get('warmup_start_epoch')}, {row['seconds']:.0f} s)",
                              file=sys.stderr, flush=True)
                    results[setting][method].append(done[key]["top1"])
    (args.out / "study.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                     "realised_noise": noise, "results": results}, indent=2))
    print(f"digits, {args.model}, {args.epochs} epochs, seeds {seeds}; clean test top-1 (%), mean ± std "
          f"({time.perf_counter() - start:.0f} s this session)\n")
    print_table(results, settings, methods, lambda s: f"{s} ({100 * noise[s]:.1f}%)")
    print()
    transfers = [m for m in methods if m.partition("/floor=")[0] in DEFAULT_TRANSFERS]
    details = {(s, m): [done[run_key(m, s, seed, args)] for seed in seeds] for s in settings for m in transfers}
    print("\n".join(goal_checks(results, noise, settings, transfers, details)))
    print()
    print_run_details(done, settings, transfers, seeds, args)


def print_run_details(done: dict[str, dict], settings: list[str], transfers: list[str], seeds: list[int],
                      args) -> None:
    """What each transferred run did: warm-up start epoch, mean applied weight, worst class."""
    print("| cell | net | seed | top-1 | warm-up start | mean weight | min class weight | worst class |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in settings:
        for method in transfers:
            for seed in seeds:
                row = done.get(run_key(method, setting, seed, args))
                if row is None:
                    continue
                worst = row.get("worst_class") or {}
                fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                print(f"| {setting} | {method} | {seed} | {row['top1']:.1f} | {row.get('warmup_start_epoch')} | "
                      f"{fmt(row.get('mean_weight'))} | {fmt(row.get('min_class_mean_weight'))} | "
                      f"{worst.get('class')} at {worst.get('top1', 0):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", action="store_true", help="the safe-transfer evidence matrix (see above)")
    parser.add_argument("--settings", default=None,
                        help="comma-separated setting names (--matrix: cell names separated by ;)")
    parser.add_argument("--methods", default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    table = MATRIX if args.matrix else SETTINGS
    settings = args.settings.split(";" if args.matrix else ",") if args.settings else list(table)
    methods = args.methods.split(",") if args.methods else list(MATRIX_METHODS if args.matrix else METHODS)
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [s for s in settings if s not in table]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {list(table)}")
    if args.matrix:
        run_matrix(args, settings, methods, seeds)
        return
    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in methods} for s in settings}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            noise, imbalance = SETTINGS[setting]
            for method in methods:
                for seed in seeds:
                    acc = run_one(method, noise, imbalance, seed, args, Path(tmp))["top1"]
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

"""Cross-dataset transfer study: does a weighting net meta-trained on one dataset help on another?

Targets are real Fashion-MNIST (60,000 images) under five biases and the embedded digits matrix's noisy cells.
Every method trains the same classifier for the same budget on the same biased training set and is scored on the
clean test split (final epoch, no early stopping):

    erm              plain cross-entropy (apply --weighting none), at the study's budget and at the short one
    ceiling          plain cross-entropy on the *clean* labels (same imbalance): what the noise costs
    class-balanced   the fixed effective-number weighting (apply --weighting class-balanced)
    mwnet / cmwnet   MW-Net / CMW-Net meta-trained on this target (10 clean samples per class held out)
    NET@BUDGET       a shipped net applied frozen with apply's DEFAULT weighting options (auto warm-up, class floor,
                     normalisation, trust check), at the study's budget or the short one (about half the epochs,
                     apply's default lr and batch size)

Per cell it reports the realised noise, each method's top-1 (mean ± std over seeds), the share of the gap from
noisy ERM to the ceiling that it recovers, the goal checks of the transferred nets (never below ERM at the same
budget by more than the seed spread; >= +3 points where the realised noise is >= 20%) and, run by run, what the
trust check said against what happened. Every finished run is appended to ``OUT/runs.jsonl``: a restart skips
what is done, and ``--jobs N`` runs N single-threaded runs at a time.

    python scripts/study_transfer.py --out runs/transfer --jobs 2          # everything (hours on 2 cores)
    python scripts/study_transfer.py --out runs/transfer --dataset digits  # the digits side only (minutes)
    python scripts/study_transfer.py --out runs/transfer --report          # tables from what is done
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study_table import load_cache

CACHE_NAME = "runs.jsonl"
NETS = {  # the MW-Net Fashion twin is left out: its source curve is flat (README "Real data"), not a net to ship
    "cmw-digits": "pretrained:cmwnet-digits-pmd",
    "mw-digits": "pretrained:mwnet-digits-pmd",
    "cmw-fmnist": "pretrained:cmwnet-fashion-mnist-pmd",
}
TARGETS = {  # dataset -> model, budgets, cells (noise, imbalance factor), the nets transferred to it, meta-trained?
    "fashion-mnist": dict(
        model="lenet",
        # the study's budget is two thirds of apply's default for this dataset (15 epochs), the short one a third;
        # both at apply's default lr and batch for it
        budgets={"study": dict(epochs=10, lr=0.05, batch_size=128), "short": dict(epochs=5, lr=0.05, batch_size=128)},
        cells={"sym 40%": ("sym:0.4", None), "asym 40%": ("asym:0.4", None), "PMD-I 35%": ("pmd1:0.35", None),
               "sym 20% + IF 10": ("sym:0.2", 10.0), "IF 50": (None, 50.0)},
        nets=("cmw-digits", "mw-digits", "cmw-fmnist"),
        meta_trained=True,
    ),
    "digits": dict(
        model="small_cnn",
        # the digits matrix's budget (scripts/study.py --matrix), and half its epochs at apply's default lr and batch
        budgets={"study": dict(epochs=30, lr=0.05, batch_size=64), "short": dict(epochs=15, lr=0.1, batch_size=128)},
        cells={f"{noise} IF {imb or 1:g}": (noise, imb) for imb in (None, 10.0)
               for noise in ("sym:0.2", "sym:0.4", "asym:0.2", "asym:0.4", "pmd1:0.35")},
        nets=("cmw-fmnist", "cmw-digits", "mw-digits"),
        meta_trained=False,  # the digits matrix (scripts/study.py --matrix) has them
    ),
}
# the meta-trained methods: the source recipe's meta settings (trainer/config.py RECIPES), at the study's budget
META = {"fashion-mnist": dict(meta_set="clean:100", meta_interval=5, meta_batch_size=100, warmup_epochs=2),
        "digits": dict(meta_set="clean:10", meta_interval=1, meta_batch_size=100, warmup_epochs=5)}


@dataclass(frozen=True)
class Run:
    dataset: str
    cell: str
    method: str  # erm, ceiling, class-balanced, mwnet, cmwnet, or a key of NETS
    budget: str  # study or short
    seed: int

    @property
    def key(self) -> str:
        return json.dumps([self.dataset, self.cell, self.method, self.budget, self.seed])


def ceiling_cell(dataset: str, cell: str) -> str:
    """The cell whose ceiling run stands for ``cell``'s: the first one with the same imbalance (the clean labels
    are the same)."""
    cells = TARGETS[dataset]["cells"]
    return next(name for name, (_, imb) in cells.items() if imb == cells[cell][1])


def planned_runs(datasets: list[str], seeds: list[int], methods: set[str] | None,
                 budgets: set[str] | None = None, cells: set[str] | None = None) -> list[Run]:
    runs = []
    for dataset in datasets:
        target = TARGETS[dataset]
        fixed = ["erm@study", "erm@short", "ceiling@study"]
        if target["meta_trained"]:
            fixed += ["class-balanced@study", "mwnet@study", "cmwnet@study"]
        transfers = [f"{net}@{budget}" for net in target["nets"] for budget in target["budgets"]]
        for cell in target["cells"]:
            for entry in fixed + transfers:
                method, budget = entry.split("@")
                if (method == "ceiling" and ceiling_cell(dataset, cell) != cell) or (cells and cell not in cells):
                    continue
                if (methods is None or method in methods) and (budgets is None or budget in budgets):
                    runs += [Run(dataset, cell, method, budget, seed) for seed in seeds]
    return runs


def execute(run: Run) -> dict:
    """One training run in this (worker) process; returns the row for runs.jsonl."""
    import torch

    from cmw_transfer.trainer.config import ApplyConfig, MetaTrainConfig
    from cmw_transfer.trainer.engine.launch import run_stage

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    target = TARGETS[run.dataset]
    noise, imbalance = target["cells"][run.cell]
    budget = target["budgets"][run.budget]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        common = dict(imbalance=imbalance, model=target["model"], seed=run.seed, device="cpu", **budget)
        if run.method in ("mwnet", "cmwnet"):
            cfg = MetaTrainConfig(src=run.dataset, out=str(out), method=run.method, noise=noise, workers=0,
                                  progress=False, **META[run.dataset], **common)
            summary = run_stage(cfg)
            return {"top1": float(summary["final"]["test_top1"]), "seconds": time.perf_counter() - start}
        weighting = {"erm": "none", "ceiling": "none", "class-balanced": "class-balanced"}.get(run.method, "cmw")
        cfg = ApplyConfig(dataset=run.dataset, out=str(out), weighting=weighting, weights=NETS.get(run.method),
                          noise=None if run.method == "ceiling" else noise, workers=0, progress=False,
                          eval_every=budget["epochs"], **common)
        summary = run_stage(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        families = out / "families.json"
        return {"top1": float(summary["final"]["test_top1"]), "seconds": time.perf_counter() - start,
                "warmup_start_epoch": summary.get("warmup_start_epoch"), "trust": summary.get("trust"),
                "worst_class": summary.get("worst_class"), "rows": rows,
                "families": json.loads(families.read_text()) if families.exists() else None}


def realised_noise(dataset: str, cell: str, seeds: list[int]) -> float:
    from cmw_transfer.dataset import create_dataset

    noise, imbalance = TARGETS[dataset]["cells"][cell]
    if noise is None:
        return 0.0
    rates = [create_dataset(dataset, None, "train", seed=s, noise=noise, imbalance=imbalance).noise_rate() or 0.0
             for s in seeds]
    return float(statistics.mean(rates))


def run_all(runs: list[Run], out: Path, jobs: int) -> None:
    cache = out / CACHE_NAME
    todo = sorted((r for r in runs if r.key not in load_cache(cache)), key=lambda r: r.seed)  # a whole seed first
    print(f"{len(runs) - len(todo)} of {len(runs)} runs done; running {len(todo)} with {jobs} job(s)",
          file=sys.stderr, flush=True)
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(execute, r): r for r in todo}
        for future in as_completed(futures):
            run = futures[future]
            row = {"key": run.key, **asdict(run), **future.result()}
            with cache.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{run.dataset:<14}{run.cell:<18}{run.method + '@' + run.budget:<20}seed {run.seed}: "
                  f"{row['top1']:.2f} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--dataset", choices=list(TARGETS), action="append")
    parser.add_argument("--methods", default=None, help="comma-separated subset (erm, ceiling, cmw-digits, ...)")
    parser.add_argument("--budgets", default=None, help="comma-separated subset of study,short")
    parser.add_argument("--cells", default=None, help="semicolon-separated subset of the cells ('sym 40%%;IF 50')")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only print the tables of what is done")
    args = parser.parse_args()
    datasets = args.dataset or list(TARGETS)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = planned_runs(datasets, seeds, set(args.methods.split(",")) if args.methods else None,
                         set(args.budgets.split(",")) if args.budgets else None,
                         set(args.cells.split(";")) if args.cells else None)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run_all(runs, args.out, args.jobs)
    from study_report import report

    report(load_cache(args.out / CACHE_NAME), datasets, seeds, realised_noise)


if __name__ == "__main__":
    main()

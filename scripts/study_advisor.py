"""Advisor networks (MFRW / MES) against ERM, EQL, MW-Net and CMW-Net on the embedded digits, plus their cost.

Quality: every method trains the same classifier (``--model``, default ``small_cnn``) for the same budget (epochs,
batch, lr, cosine schedule, CE warm-up) on the same biased training set; clean test top-1 of the final epoch,
mean ± std over seeds:

    erm          plain cross-entropy                      (apply --weighting none)
    eql          fixed equalization loss, lambda = 1/(2C)  (apply --weighting eql)
    mwnet        MW-Net meta-trained on this data          (metatrain --method mwnet)
    cmwnet       CMW-Net meta-trained on this data         (metatrain --method cmwnet)
    mfrw / mes / mfrw+mes   advisor networks               (metatrain --method advisor --advisor ...)

The meta-trained methods hold out 10 clean samples per class (before the bias) as their meta set.

Cost: one training iteration of each stage on the same batches, timed side by side (interleaved, several repeats,
median): an ERM step (the meta-train stage in its CE warm-up), a CMW-Net meta-iteration and an advisor
meta-iteration (``--meta-grad exact``, meta step + actual step); and the peak memory of each (CUDA: peak allocated;
CPU: peak of the tensor storages the step allocates and keeps alive, tracked op by op).

    python scripts/study_advisor.py                                   # ~10 minutes on 2 busy CPU cores
    python scripts/study_advisor.py --seeds 0 --settings pairflip     # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # exact, and faster than 2 contended threads on small models

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_table import print_table

from cmw_transfer.trainer.config import METHOD_DEFAULTS, ApplyConfig, MetaTrainConfig
from cmw_transfer.trainer.engine.launch import launch, run_stage

SETTINGS = {  # name -> (noise, imbalance)
    "pairflip": ("asym:0.6:pairflip", None),
    "long-tail+pairflip": ("asym:0.4:pairflip", 10.0),
}
ADVISORS = {"mfrw": "mfrw", "mes": "mes", "mfrw+mes": "mfrw,mes"}
METHODS = ("erm", "eql", "mwnet", "cmwnet", *ADVISORS)


def meta_cfg(method: str, out: Path, common: dict, args) -> MetaTrainConfig:
    if method in ADVISORS:
        extra = {**METHOD_DEFAULTS["advisor"], "advisor": ADVISORS[method]}
        if args.advisor_lr is not None:
            extra["meta_lr"] = args.advisor_lr
        return MetaTrainConfig(src="digits", out=str(out), method="advisor", meta_set="clean:10",
                               meta_batch_size=100, **extra, **common)
    return MetaTrainConfig(src="digits", out=str(out), method=method, meta_set="clean:10", meta_batch_size=100,
                           **common)


def run_one(method: str, noise: str | None, imbalance: float | None, seed: int, args, workdir: Path) -> float:
    out = workdir / f"{method}-{noise}-{imbalance}-{seed}"
    common = dict(noise=noise, imbalance=imbalance, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, warmup_epochs=args.warmup_epochs, seed=seed, device=args.device)
    if method in ("erm", "eql"):
        cfg = ApplyConfig(dataset="digits", out=str(out), weighting="none" if method == "erm" else "eql",
                          workers=0, progress=False, overwrite=True, **common)
        return float(run_stage(cfg)["final"]["test_top1"])
    cfg = meta_cfg(method, out, common, args)
    return float(run_stage(replace(cfg, progress=False))["final"]["test_top1"])


# -- cost -----------------------------------------------------------------------------------------------------
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the block and still alive (device independent).

    Every op's outputs are tracked by storage (views and in-place results count once); a storage is released
    when its last reference dies. What existed before the block (parameters, optimizer state) is not counted, so
    the peak is the extra memory of the step: activations, the graphs kept, gradients, virtual weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), size)
                    self.now += size
        self.peak = max(self.peak, self.now)
        return out


def cost(args, workdir: Path) -> dict[str, dict[str, float]]:
    """Seconds per iteration (median over repeats) and peak memory of an ERM step, a CMW-Net and an advisor
    meta-iteration, on the same batches."""
    noise, imbalance = SETTINGS["pairflip"]
    common = dict(noise=noise, imbalance=imbalance, model=args.model, epochs=1, batch_size=args.batch_size,
                  lr=args.lr, warmup_epochs=0, seed=0, device=args.device)
    stages = {}
    for name, method in (("erm step", "cmwnet"), ("cmwnet meta-iteration", "cmwnet"),
                         ("advisor meta-iteration", "mfrw+mes")):
        cfg = meta_cfg(method, workdir / f"cost-{name.replace(' ', '-')}", common, args)
        if name == "erm step":
            cfg = replace(cfg, warmup_epochs=1)
        stage = launch(replace(cfg, progress=False)).stage
        stage.begin_epoch(0)
        stage.seed_epoch(0)
        stages[name] = stage
    batches = [b for _, b in zip(range(args.cost_steps), stages["erm step"].train_loader())]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    times: dict[str, list[float]] = {n: [] for n in stages}
    for _ in range(args.repeats):  # interleaved: the machine's load hits every method alike
        for name, stage in stages.items():
            for it, batch in enumerate(batches[:2]):  # warm
                stage.train_step(it, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for it, batch in enumerate(batches):
                stage.train_step(it, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / len(batches))
    memory: dict[str, float] = {}
    for name, stage in stages.items():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for it, batch in enumerate(batches[:3]):
                stage.train_step(it, batch)
            memory[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            continue
        tracker = PeakTensorMemory()
        with tracker:
            for it, batch in enumerate(batches[:3]):
                stage.train_step(it, batch)
        memory[name] = tracker.peak / 2**20
    med = {n: statistics.median(t) for n, t in times.items()}
    return {n: {"seconds": med[n], "x erm": med[n] / med["erm step"],
                "x cmwnet": med[n] / med["cmwnet meta-iteration"], "peak MiB": memory[n]} for n in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--advisor-lr", type=float, default=None, help="advisor Adam lr (default: the paper's 1e-4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cost-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/study_advisor"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings, methods = args.settings.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in methods} for s in settings}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quality:
            for setting in settings:
                noise, imbalance = SETTINGS[setting]
                for method in methods:
                    for seed in seeds:
                        acc = run_one(method, noise, imbalance, seed, args, Path(tmp))
                        results[setting][method].append(acc)
                        print(f"{setting:<20}{method:<10}seed {seed}: {acc:.2f}", file=sys.stderr)
        quality_seconds = time.perf_counter() - start
        costs = cost(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study_advisor.json").write_text(json.dumps(
        {"config": {k: str(v) for k, v in vars(args).items()}, "results": results, "cost": costs}, indent=2))
    if not args.skip_quality:
        print(f"digits, {args.model}, {args.epochs} epochs ({args.warmup_epochs} CE warm-up), seeds {seeds}; clean "
              f"test top-1 (%), mean ± std ({quality_seconds:.0f} s)\n")
        def label(setting: str) -> str:
            noise, imbalance = SETTINGS[setting]
            return f"{setting} ({noise}{f', IF {imbalance:g}' if imbalance else ''})"

        print_table(results, settings, methods, label)
    print(f"\ncost per iteration, {args.model}, batch {args.batch_size}, meta batch 100, device {args.device} "
          f"(median of {args.repeats} x {args.cost_steps} steps)\n")
    print("| step | ms | x ERM step | x CMW-Net meta-iteration | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for name, c in costs.items():
        print(f"| {name} | {1e3 * c['seconds']:.1f} | {c['x erm']:.2f} | {c['x cmwnet']:.2f} | "
              f"{c['peak MiB']:.1f} |")


if __name__ == "__main__":
    main()

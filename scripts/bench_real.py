"""Performance at real size (Fashion-MNIST, 60,000 images), side by side in one run: interleaved repeats, medians.

1. **apply epoch vs ERM epoch**: the real apply stage (``build_setup`` + the ``erm`` trainer, the real loader with
   the default workers) driven through the engine's per-epoch hooks (``begin_epoch``, ``seed_epoch``,
   ``train_loader().set_epoch``, ``train_step``), once with ``--weighting none`` and once with a frozen net (weighted
   from the first epoch); ``--epoch-fraction`` times a leading share of each epoch.
2. **meta-train iteration vs ERM iteration**: the real meta-train stage on ``fashion-mnist-pmd`` with its recipe:
   CE warm-up iterations (ERM) against iterations with an exact meta step, and the recipe's amortised iteration
   (a meta step every ``meta_interval`` iterations).
3. **loader vs a bare TensorDataset loop**: images/s of the apply loader (uint8 store, float per sample, default
   workers) against ``DataLoader(TensorDataset(x, y, i), shuffle=True)`` over the same images as float tensors.
4. **load** (``--only load``): reading and validating the four gzipped idx files of the train split (60,000 images).
5. **eta** (``--only eta``): PMD's pooled-knn eta for the 60,000 training images, uncached (one run: it is long).

Every figure is a median over interleaved repeats, in wall-clock time and in CPU time (this process's threads,
plus its DataLoader workers' read from /proc): the machine is shared, so ratios and CPU times are the numbers to
read. Needs the Fashion-MNIST files (``apt-get install -y dataset-fashion-mnist``).

    python scripts/bench_real.py                          # about 10 minutes on 2 idle cores
    python scripts/bench_real.py --repeats 3 --epoch-fraction 0.25 --meta-steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmw_transfer.runtime import configure_threads, default_workers


def children_cpu() -> float:
    """CPU seconds of this process's live children (the DataLoader workers), from /proc; 0 where it is absent."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process + its workers, images) of one call."""
    wall, cpu, kids = time.perf_counter(), time.process_time(), children_cpu()
    images = fn()
    return time.perf_counter() - wall, time.process_time() - cpu + children_cpu() - kids, images


def apply_trainer(weights: str | None, out: Path, workers: int, batch_size: int):
    from cmw_transfer.trainer.apply.setup import build_setup
    from cmw_transfer.trainer.config import ApplyConfig
    from cmw_transfer.trainer.engine.distributed import DistributedContext
    from cmw_transfer.trainer.engine.registry import create_trainer

    cfg = ApplyConfig(dataset="fashion-mnist", out=str(out), model="lenet", epochs=100, batch_size=batch_size,
                      lr=0.05, weighting="cmw" if weights else "none", weights=weights, warmup_epochs=0,
                      workers=workers, device="cpu", progress=False)
    trainer = create_trainer("erm", build_setup(cfg, DistributedContext.from_env("cpu")))
    trainer.start(0)
    return trainer


def run_epoch(trainer, epoch: int, fraction: float) -> int:
    """The engine's epoch loop without its bookkeeping; the first ``fraction`` of the batches."""
    trainer.begin_epoch(epoch)
    trainer.seed_epoch(epoch)
    loader = trainer.train_loader()
    loader.set_epoch(epoch)
    limit, seen = max(1, round(fraction * len(loader))), 0
    for step, batch in enumerate(loader):
        if step >= limit:
            break
        seen += trainer.train_step(step, batch)
    return seen


def median_rows(rows: dict[str, list[tuple[float, float, int]]]) -> dict[str, tuple[float, float, float]]:
    """name -> (median wall s, median CPU s, images per run)."""
    return {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2])
            for name, runs in rows.items()}


def bench_apply(args: argparse.Namespace, workers: int, tmp: Path) -> None:
    trainers = {"ERM (--weighting none)": apply_trainer(None, tmp / "erm", workers, args.batch_size),
                f"apply, frozen {args.weights}": apply_trainer(args.weights, tmp / "cmw", workers, args.batch_size)}
    rows: dict[str, list] = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(args.repeats + 1):  # round 0 warms the workers and caches up, and is not counted
        for name in names[r % 2:] + names[: r % 2]:
            result = timed(lambda t=trainers[name], r=r: run_epoch(t, r, args.epoch_fraction))
            if r:
                rows[name].append(result)
    med = median_rows(rows)
    print(f"\n### apply epoch vs ERM epoch: lenet, batch {args.batch_size}, {workers} loader worker(s), "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds of {args.epoch_fraction:g} epoch\n")
    print("| mode | epoch s (wall, median) | epoch s (CPU) | images/s | ratio to ERM (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        wall, cpu, images = med[name]
        scale = 1.0 / args.epoch_fraction
        ratios = [a[0] / b[0] for a, b in zip(rows[name], rows[names[0]], strict=True)]
        cpu_ratios = [a[1] / b[1] for a, b in zip(rows[name], rows[names[0]], strict=True)]
        print(f"| {name} | {wall * scale:.1f} | {cpu * scale:.1f} | {images / wall:.0f} | "
              f"{statistics.median(ratios):.3f} | {statistics.median(cpu_ratios):.3f} |")


def bench_metatrain(args: argparse.Namespace, tmp: Path) -> None:
    from dataclasses import fields

    from cmw_transfer.trainer.config import MetaTrainConfig, recipe_for
    from cmw_transfer.trainer.engine.registry import create_trainer

    values = {f.name: f.default for f in fields(MetaTrainConfig)}
    values.update(recipe_for("fashion-mnist-pmd"))
    interval = int(values["meta_interval"])
    values.update(src="fashion-mnist-pmd", out=str(tmp / "meta"), warmup_epochs=1, meta_interval=1, device="cpu")
    trainer = create_trainer("metatrain", MetaTrainConfig.from_dict(values), progress=False)
    loader = trainer.train_loader()

    def steps(epoch: int) -> int:
        trainer.begin_epoch(epoch)  # epoch 0: CE warm-up (ERM); epoch 1: a meta step every iteration
        trainer.seed_epoch(epoch)
        loader.set_epoch(epoch)
        seen = 0
        for step, batch in enumerate(loader):
            if step >= args.meta_steps:
                break
            seen += trainer.train_step(step, batch)
        return seen

    rows: dict[str, list] = {"ERM iteration (CE warm-up)": [], "meta-train iteration (exact meta step)": []}
    names = list(rows)
    for r in range(args.repeats + 1):
        for k in (r % 2, 1 - r % 2):
            result = timed(lambda k=k: steps(k))
            if r:
                rows[names[k]].append(result)
    med = median_rows(rows)
    erm_wall, erm_cpu, _ = med[names[0]]
    meta_wall, meta_cpu, _ = med[names[1]]
    n = args.meta_steps
    print(f"\n### meta-train iteration vs ERM iteration: fashion-mnist-pmd recipe ({values['model']}, batch "
          f"{values['batch_size']}, meta batch {values['meta_batch_size']}, {values['meta_grad']}), {args.repeats} "
          f"interleaved rounds of {n} iterations\n")
    print("| iteration | ms (wall, median) | ms (CPU) | ratio to ERM (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|")
    for name in names:
        wall, cpu, _ = med[name]
        print(f"| {name} | {1000 * wall / n:.1f} | {1000 * cpu / n:.1f} | {wall / erm_wall:.2f} | "
              f"{cpu / erm_cpu:.2f} |")
    amort_wall = (meta_wall + (interval - 1) * erm_wall) / interval
    amort_cpu = (meta_cpu + (interval - 1) * erm_cpu) / interval
    print(f"| recipe: a meta step every {interval} iterations (amortised) | {1000 * amort_wall / n:.1f} | "
          f"{1000 * amort_cpu / n:.1f} | {amort_wall / erm_wall:.2f} | {amort_cpu / erm_cpu:.2f} |")


def bench_loader(args: argparse.Namespace, workers: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from cmw_transfer.dataset import create_dataset
    from cmw_transfer.trainer.engine.loaders import make_loader

    ds = create_dataset("fashion-mnist")
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255.0)  # the same images as float tensors
    bare = DataLoader(TensorDataset(x, torch.as_tensor(ds.targets), torch.arange(len(ds))),
                      batch_size=args.batch_size, shuffle=True, drop_last=True)
    loaders = {f"apply loader (uint8 store, {workers} worker(s))": make_loader(
        ds, args.batch_size, train=True, workers=workers, seed=0, distributed=False),
        "bare TensorDataset loop (float tensors, main process)": bare}
    rows: dict[str, list] = {name: [] for name in loaders}
    names = list(loaders)

    def drain(name: str, epoch: int) -> int:
        loader = loaders[name]
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        return sum(int(batch[1].shape[0]) for batch in loader)

    for r in range(args.repeats + 1):
        for name in names[r % 2:] + names[: r % 2]:
            result = timed(lambda name=name, r=r: drain(name, r))
            if r:
                rows[name].append(result)
    med = median_rows(rows)
    print(f"\n### loader throughput: one epoch of 60,000 images, batch {args.batch_size}, {args.repeats} interleaved "
          "rounds (round 0, with the worker start, not counted)\n")
    print("| loader | images/s (wall, median) | CPU s per epoch | ratio to the bare loop (images/s) |")
    print("|---|---|---|---|")
    base = med[names[1]][2] / med[names[1]][0]
    for name in names:
        wall, cpu, images = med[name]
        print(f"| {name} | {images / wall:.0f} | {cpu:.2f} | {images / wall / base:.2f} |")


def bench_load(args: argparse.Namespace) -> None:
    from cmw_transfer.dataset.formats import mnist

    runs = [timed(lambda: len(mnist.load("fashion-mnist", None, "train"))) for _ in range(args.repeats + 1)][1:]
    walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
    print(f"\n### load: the train split (60,000 images + labels, idx, gzipped), {args.repeats} repeats\n")
    print(f"median {statistics.median(walls):.2f} s wall (min {min(walls):.2f}), {statistics.median(cpus):.2f} s CPU")


def bench_eta() -> None:
    from cmw_transfer.bias import estimate_eta
    from cmw_transfer.dataset import create_dataset

    ds = create_dataset("fashion-mnist")
    with tempfile.TemporaryDirectory() as empty:  # a fresh cache: computed, not read
        wall, cpu, _ = timed(lambda: len(estimate_eta(ds, cache_dir=empty)))
    print(f"\n### eta: pooled-knn on the 60,000 training images, uncached, {torch.get_num_threads()} threads\n")
    print(f"{wall:.1f} s wall, {cpu:.1f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epoch-fraction", type=float, default=1.0, help="share of each apply epoch timed")
    parser.add_argument("--meta-steps", type=int, default=40, help="iterations per meta-train measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weights", default="pretrained:cmwnet-fashion-mnist-pmd")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as the CLI)")
    parser.add_argument("--only", default="load,eta,apply,metatrain,loader",
                        help="which sections, comma-separated")
    args = parser.parse_args()
    configure_threads(args.threads, 1)
    workers = default_workers(1)
    sections = {s.strip() for s in args.only.split(",")}
    if "load" in sections:
        bench_load(args)
    if "eta" in sections:
        bench_eta()
    with tempfile.TemporaryDirectory() as tmp:
        if "apply" in sections:
            bench_apply(args, workers, Path(tmp))
        if "metatrain" in sections:
            bench_metatrain(args, Path(tmp))
        if "loader" in sections:
            bench_loader(args, workers)


if __name__ == "__main__":
    main()

"""One full meta-iteration: the authors' literal MW-Net / CMW-Net step vs the toolkit's, same model and batches.

The authors' step (``tests/reference_official.py``): fresh model + ``load_state_dict``, forward, ``autograd.grad(
create_graph=True)``, plain-SGD virtual update into the copy, meta CE, backward to the weighting net (their
``ACVNet`` with its per-sample head loop), Adam step, then a second forward and SGD step of the real model. The
toolkit's: shared forward, exact meta-gradient (``meta_gradient``), net step, real step, in the default ``reuse``
order and in the paper's ``updated`` order (same order as the authors'); also both orders with the reference
``torch.func.jvp`` dual forward (``*-jvp``: the code before the fused one), a plain ERM step, and the **work floor**
(train fwd+bwd + meta fwd+bwd + one plain forward). Option-A ResNet-32, 32x32, float32, CMW-Net with 3 heads.

Every repeat runs every mode once (interleaved); the table gives medians, the speed-up of each toolkit mode over the
authors' step, its ratio to the work floor, and CPU utilisation (process CPU time / (wall x threads)): repeats where
the machine was busy with other work show up as utilisation well below 100%, and a second table repeats the
medians over the quiet rounds only (every mode at >= ``--quiet-util``); a third gives medians of the process's own
CPU time (with one thread, robust to other work sharing the cores, though not to cache contention). Peak memory is
measured per mode in a fresh process (CPU: RSS high-water mark above the steady state; CUDA: max_memory_allocated).

    OMP_NUM_THREADS=1 python scripts/bench_vs_reference.py --threads 1 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmw_transfer.artifact.net import CMWNet  # noqa: E402
from cmw_transfer.models import create_model  # noqa: E402
from cmw_transfer.trainer.meta.metastep import VirtualStep, meta_gradient, virtual_names  # noqa: E402
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE  # noqa: E402
from tests.reference_official import authors_net_like, official_iteration  # noqa: E402

FAMILY = [2, 2, 1, 1, 1, 0, 0, 0, 0, 0]  # class -> head, the authors' list ``c``
MODES = ("authors", "exact", "exact-jvp", "exact-updated", "exact-updated-jvp", "erm", "floor")


class Setup:
    """Model, both weighting nets (same function), optimizers and the fixed batches of one benchmark."""

    def __init__(self, args: argparse.Namespace) -> None:
        dev = args.device
        torch.manual_seed(0)
        self.build = lambda: create_model(args.model, 10, 3)
        self.model = self.build().to(dev).train()
        self.init = copy.deepcopy(self.model.state_dict())
        self.x = torch.randn(args.batch_size, 3, args.size, args.size, device=dev)
        self.y = torch.randint(0, 10, (args.batch_size,), device=dev)
        self.xm = torch.randn(args.meta_batch_size, 3, args.size, args.size, device=dev)
        self.ym = torch.randint(0, 10, (args.meta_batch_size,), device=dev)
        self.wnet = CMWNet(num_heads=3).to(dev)
        self.authors = authors_net_like(self.wnet).to(dev)
        self.batch = TrainBatch(self.x, self.y, torch.tensor(FAMILY, device=dev))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.wopt = torch.optim.Adam(self.wnet.parameters(), lr=1e-3, weight_decay=1e-4)
        self.aopt = torch.optim.Adam(self.authors.parameters(), lr=1e-3, weight_decay=1e-4)

    def step(self, mode: str) -> Callable[[], None]:
        return {"authors": self.authors_step, "exact": lambda: self.toolkit_step("reuse"),
                "exact-jvp": lambda: self.toolkit_step("reuse", "jvp"),
                "exact-updated": lambda: self.toolkit_step("updated"),
                "exact-updated-jvp": lambda: self.toolkit_step("updated", "jvp"),
                "erm": self.erm_step, "floor": self.floor}[mode]

    def authors_step(self) -> None:
        official_iteration(self.build, self.model, self.authors, self.opt, self.aopt, self.x, self.y, FAMILY,
                           self.xm, self.ym)

    def toolkit_step(self, order: str, derivatives: str = "auto") -> None:
        objective, params = WeightedCE(), dict(self.model.named_parameters())
        logits = self.model(self.x)
        terms = objective.terms(logits, self.batch)
        res = meta_gradient(self.model, self.wnet, params, dict(self.model.named_buffers()), self.batch, self.xm,
                            self.ym, objective, VirtualStep(self.opt.param_groups[0]["lr"]),
                            virtual_names(self.model, "exact"), train_out=(logits, terms),
                            keep_graph=order == "updated", derivatives=derivatives)
        for n, p in self.wnet.named_parameters():
            p.grad = res.wnet_grads[n]
        self.wopt.step()
        self.opt.zero_grad(set_to_none=True)
        if order == "updated":  # re-weight with the updated net and backpropagate the kept graph
            with torch.no_grad():
                coeff = objective.coefficients(self.wnet, terms.detach(), self.batch)
            (coeff * terms).sum().backward()
        else:
            for n, p in params.items():
                p.grad = res.train_grads[n]
        self.opt.step()

    def erm_step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def floor(self) -> None:
        """The work no exact meta-iteration can skip: train fwd+bwd, meta fwd+bwd, one plain forward."""
        params = list(self.model.parameters())
        torch.autograd.grad(F.cross_entropy(self.model(self.x), self.y), params)
        torch.autograd.grad(F.cross_entropy(self.model(self.xm), self.ym), params)
        with torch.no_grad():
            self.model(self.x)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Per mode, per repeat: (wall seconds, CPU utilisation)."""
    s = Setup(args)
    steps = {m: s.step(m) for m in MODES}
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    out: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode, fn in steps.items():
            s.model.load_state_dict(s.init)
            gc.collect()
            sync(args.device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(args.device)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            out[mode].append((wall, cpu / (wall * args.threads)))
    return out


def peak_memory(args: argparse.Namespace, mode: str) -> float:
    """Bytes one iteration of ``mode`` needs above the steady state, in this (fresh) process."""
    s = Setup(args)
    fn = s.step(mode)
    fn()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    fn()
    return float((_status_kib("VmHWM") - base) * 1024)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--memory-probe", mode, "--threads", str(args.threads), "--device",
               args.device, "--batch-size", str(args.batch_size), "--meta-batch-size", str(args.meta_batch_size),
               "--size", str(args.size), "--model", args.model]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks mmapped: RSS follows live memory
        out[mode] = float(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.split()[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--meta-batch-size", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--quiet-util", type=float, default=0.9,
                        help="CPU utilisation every mode of a round must reach for the round to count as quiet")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(peak_memory(args, args.memory_probe))
        return
    times = time_modes(args)
    mem = {} if args.no_memory else memory(args)
    med = {m: statistics.median(w for w, _ in v) for m, v in times.items()}
    print(f"device={args.device} threads={args.threads} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"model={args.model} batch={args.batch_size} meta_batch={args.meta_batch_size} size={args.size} "
          f"repeats={args.repeats} torch={torch.__version__}")
    print("| mode | ms (median) | authors / mode | mode / work floor | x ERM | CPU util median (min) "
          "| peak working set MB | x authors' |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        util = [u for _, u in times[mode]]
        mem_txt = "- | -" if not mem else f"{mem[mode] / 2**20:.0f} | {mem[mode] / mem['authors']:.2f}"
        print(f"| {mode} | {1000 * med[mode]:.1f} | {med['authors'] / med[mode]:.2f} | "
              f"{med[mode] / med['floor']:.2f} | {med[mode] / med['erm']:.2f} | "
              f"{100 * statistics.median(util):.0f}% ({100 * min(util):.0f}%) | {mem_txt} |")
    rounds = range(args.repeats)
    quiet = [r for r in rounds if min(times[m][r][1] for m in MODES) >= args.quiet_util]
    if quiet:  # rounds in which no mode was starved of CPU by other work on the machine
        qmed = {m: statistics.median(times[m][r][0] for r in quiet) for m in MODES}
        print(f"quiet rounds only (every mode >= {100 * args.quiet_util:.0f}% CPU): {len(quiet)} of {args.repeats}")
        print("| mode | ms (median) | authors / mode | mode / work floor | x ERM |")
        print("|---|---|---|---|---|")
        for mode in MODES:
            print(f"| {mode} | {1000 * qmed[mode]:.1f} | {qmed['authors'] / qmed[mode]:.2f} | "
                  f"{qmed[mode] / qmed['floor']:.2f} | {qmed[mode] / qmed['erm']:.2f} |")
    else:
        print(f"no round had every mode at >= {100 * args.quiet_util:.0f}% CPU: the machine was busy throughout")
    # the process's own CPU time: what the step costs when the cores are shared with other work (one thread)
    cmed = {m: statistics.median(w * u * args.threads for w, u in times[m]) for m in MODES}
    print("medians of process CPU time (robust to other work on the machine; meaningful with one thread)")
    print("| mode | CPU ms (median) | authors / mode | mode / work floor | x ERM |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | {1000 * cmed[mode]:.1f} | {cmed['authors'] / cmed[mode]:.2f} | "
              f"{cmed[mode] / cmed['floor']:.2f} | {cmed[mode] / cmed['erm']:.2f} |")
    print("per repeat (ms, CPU util):")
    for mode in MODES:
        print(f"  {mode:>18}: " + "  ".join(f"{1000 * w:.0f}/{100 * u:.0f}%" for w, u in times[mode]))


if __name__ == "__main__":
    main()

"""One full meta-iteration: the authors' own MW-Net / CMW-Net step vs the toolkit's, same model and batches.

The baseline is the authors' code itself when checkouts are given: ``--official-mwn DIR`` (github
xjtushujun/meta-weight-net) runs ``MW-Net.py``'s ``train()`` unchanged on a one-batch loader, ``--official-cmwn DIR``
(github xjtushujun/CMW-Net) gives it CMW-Net's ``ACVNet`` (K=3) through a two-line adapter; ``authors_code.py``
says how they are loaded and what is patched to run them (their hard-coded ``.cuda()`` on CPU, their data module
at import). Without ``--official-cmwn`` the weighting net is MW-Net's ``VNet`` and the toolkit's net has K=1.
Without any checkout the baseline falls back to the **stand-in**, ``tests/reference_official.py`` (the same step
re-implemented; it equals the authors' code to rounding and costs the same, see docs/metastep.md), and every
table says so. ``--also-stand-in`` times the stand-in next to the authors' code.

Before timing, with the authors' code: one iteration of theirs against the toolkit's in the paper's order, float64
on small inputs, from the same weights: the weighting net's meta-gradient and the classifier after the step must
agree (printed, and the run stops if they do not).

The toolkit's modes: shared forward, exact meta-gradient (``meta_gradient``), net step, real step, in the default
``reuse`` order and in the paper's ``updated`` order (the authors' order); both orders also with the reference
``torch.func.jvp`` dual forward (``*-jvp``: the code before the fused one); a plain ERM step; the **work floor**
(train fwd+bwd + meta fwd+bwd + one plain forward) and the **exact floor** (the same with two plain forwards: a
convolution's tangent is two products of the primal's size, so even a tangent-only dual pass on saved
activations does 1.99x a forward's multiply-accumulates; docs/metastep.md). ``baseline / exact floor`` is the
largest speed-up any exact meta-iteration can have over the baseline on this machine.
Option-A ResNet-32, 32x32, float32.

Every repeat runs every mode once (interleaved); the table gives medians, the speed-up of each mode over the
baseline, its ratio to the work floor, and CPU utilisation (process CPU time / (wall x threads)): repeats where
the machine was busy with other work show up as utilisation well below 100%, and a second table repeats the
medians over the quiet rounds only (every mode at >= ``--quiet-util``); a third gives medians of the process's own
CPU time (with one thread, robust to other work sharing the cores, though not to cache contention). Peak memory is
measured per mode in a fresh process (CPU: RSS high-water mark above the steady state; CUDA: max_memory_allocated).

    OMP_NUM_THREADS=1 python scripts/bench_vs_reference.py --threads 1 --repeats 9 \\
        --official-mwn path/to/meta-weight-net --official-cmwn path/to/CMW-Net
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
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from authors_code import (  # noqa: E402
    AuthorsStep,
    LoadError,
    check_checkouts,
    classifier_state,
    copy_classifier,
    copy_weighting_net,
    weighting_net_grads,
)

from cmw_transfer.artifact.net import CMWNet  # noqa: E402
from cmw_transfer.models import create_model  # noqa: E402
from cmw_transfer.trainer.meta.metastep import VirtualStep, meta_gradient, virtual_names  # noqa: E402
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE  # noqa: E402
from tests.reference_official import authors_net_like, official_iteration  # noqa: E402

FAMILY = [2, 2, 1, 1, 1, 0, 0, 0, 0, 0]  # class -> head, the authors' list ``c``
TOOLKIT = ("exact", "exact-jvp", "exact-updated", "exact-updated-jvp", "erm", "floor", "floor-exact")
STAND_IN = "stand-in"
LABELS = {
    "authors": "authors' code: MW-Net.py train() unchanged, CMW-Net's ACVNet (K=3)",
    "authors-mwn": "authors' code: MW-Net.py train() unchanged, its VNet (K=1)",
    STAND_IN: "stand-in: tests/reference_official.py, the authors' step re-implemented (no checkout given)",
}
# the authors' code warns on every call (reduce=False, kaiming_normal, F.sigmoid): not this benchmark's news
warnings.filterwarnings("ignore", message=".*(size_average and reduce|kaiming_normal|sigmoid).*")


def baseline_name(args: argparse.Namespace) -> str:
    if not args.official_mwn:
        return STAND_IN
    return "authors" if args.official_cmwn else "authors-mwn"


def modes_of(args: argparse.Namespace) -> tuple[str, ...]:
    base = baseline_name(args)
    extra = (STAND_IN,) if args.also_stand_in and base != STAND_IN else ()
    return (base, *extra, *TOOLKIT)


class Setup:
    """Model, weighting nets (one function in every layout), optimizers and the fixed batches of one benchmark."""

    def __init__(self, args: argparse.Namespace, dtype: torch.dtype = torch.float32) -> None:
        dev = args.device
        self.heads = 1 if baseline_name(args) == "authors-mwn" else 3
        self.family = FAMILY if self.heads == 3 else [0] * 10
        torch.manual_seed(0)
        self.build = lambda: create_model(args.model, 10, 3).to(dtype)
        self.model = self.build().to(dev).train()
        self.x = torch.randn(args.batch_size, 3, args.size, args.size, device=dev, dtype=dtype)
        self.y = torch.randint(0, 10, (args.batch_size,), device=dev)
        self.xm = torch.randn(args.meta_batch_size, 3, args.size, args.size, device=dev, dtype=dtype)
        self.ym = torch.randint(0, 10, (args.meta_batch_size,), device=dev)
        self.wnet = CMWNet(num_heads=self.heads).to(dev, dtype)
        self.batch = TrainBatch(self.x, self.y, torch.tensor(self.family, device=dev))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.wopt = torch.optim.Adam(self.wnet.parameters(), lr=1e-3, weight_decay=1e-4)
        self.theirs: AuthorsStep | None = None
        if args.official_mwn:
            self.theirs = AuthorsStep(args.official_mwn, dev, self.x, self.y, self.xm, self.ym,
                                      cmwn_dir=args.official_cmwn, family=self.family if self.heads > 1 else None)
            copy_classifier(self.theirs.model, self.model)
            copy_weighting_net(self.theirs.vnet, self.wnet)
            self.theirs_init = copy.deepcopy(self.theirs.model.state_dict())
        self.init = copy.deepcopy(self.model.state_dict())
        self.stand_in = authors_net_like(self.wnet).to(dev)
        self.sopt = torch.optim.Adam(self.stand_in.parameters(), lr=1e-3, weight_decay=1e-4)

    def reset(self) -> None:
        """Every mode starts from the same classifier (the nets drift by 1e-3 Adam steps: immaterial to time)."""
        self.model.load_state_dict(self.init)
        if self.theirs is not None:
            self.theirs.model.load_state_dict(self.theirs_init)

    def step(self, mode: str) -> Callable[[], None]:
        if mode in ("authors", "authors-mwn"):
            assert self.theirs is not None
            return self.theirs
        return {STAND_IN: self.stand_in_step, "exact": lambda: self.toolkit_step("reuse"),
                "exact-jvp": lambda: self.toolkit_step("reuse", "jvp"),
                "exact-updated": lambda: self.toolkit_step("updated"),
                "exact-updated-jvp": lambda: self.toolkit_step("updated", "jvp"),
                "erm": self.erm_step, "floor": lambda: self.floor(1), "floor-exact": lambda: self.floor(2)}[mode]

    def stand_in_step(self) -> None:
        official_iteration(self.build, self.model, self.stand_in, self.opt, self.sopt, self.x, self.y, self.family,
                           self.xm, self.ym)

    def toolkit_step(self, order: str, derivatives: str = "auto") -> dict[str, torch.Tensor]:
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
        return res.wnet_grads

    def erm_step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def floor(self, forwards: int) -> None:
        """Work no exact meta-iteration can skip: train fwd+bwd, meta fwd+bwd, and ``forwards`` plain forwards
        (1: the work floor; 2: the exact floor, a tangent pass's 1.99x a forward's multiply-accumulates)."""
        params = list(self.model.parameters())
        torch.autograd.grad(F.cross_entropy(self.model(self.x), self.y), params)
        torch.autograd.grad(F.cross_entropy(self.model(self.xm), self.ym), params)
        with torch.no_grad():
            for _ in range(forwards):
                self.model(self.x)


def check_against_authors(args: argparse.Namespace) -> dict[str, float]:
    """One iteration of the authors' code and of the toolkit (paper's order) from the same weights, float64:
    max abs differences of the net's meta-gradient and of the classifier after the step, and their scales."""
    small = argparse.Namespace(**{**vars(args), "batch_size": 8, "meta_batch_size": 6, "size": 16})
    s = Setup(small, torch.float64)
    assert s.theirs is not None
    with torch.no_grad():  # non-trivial BN affine parameters and statistics, as the official-step tests
        for name, t in s.model.state_dict().items():
            if name.endswith("running_mean"):
                t.uniform_(-0.1, 0.1)
            elif "bn" in name and name.endswith(("weight", "bias")):
                t.uniform_(0.5, 1.5) if name.endswith("weight") else t.uniform_(-0.2, 0.2)
    copy_classifier(s.theirs.model, s.model)
    ours = s.toolkit_step("updated")
    s.theirs()
    theirs = weighting_net_grads(s.theirs.vnet)
    after = classifier_state(s.theirs.model)
    grad_diff = max(float((ours[n] - theirs[n]).abs().max()) for n in ours)
    state = {n: t for n, t in s.model.state_dict().items() if not n.endswith("num_batches_tracked")}
    model_diff = max(float((t - after[n].detach()).abs().max()) for n, t in state.items())
    return {"net_grad_max_abs_diff": grad_diff, "net_grad_max_abs": max(float(g.abs().max()) for g in theirs.values()),
            "classifier_max_abs_diff": model_diff,
            "classifier_max_abs": max(float(t.abs().max()) for t in state.values())}


def agree(check: dict[str, float], rtol: float = 1e-9) -> bool:
    """Both the meta-gradient and the classifier after the step equal to rounding (relative to their scale)."""
    return (check["net_grad_max_abs_diff"] <= rtol * max(check["net_grad_max_abs"], 1.0)
            and check["classifier_max_abs_diff"] <= rtol * max(check["classifier_max_abs"], 1.0))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Per mode, per repeat: (wall seconds, CPU utilisation)."""
    s = Setup(args)
    steps = {m: s.step(m) for m in modes_of(args)}
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    out: dict[str, list[tuple[float, float]]] = {m: [] for m in steps}
    for _ in range(args.repeats):
        for mode, fn in steps.items():
            s.reset()
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
    for mode in modes_of(args):
        cmd = [sys.executable, __file__, "--memory-probe", mode, "--threads", str(args.threads), "--device",
               args.device, "--batch-size", str(args.batch_size), "--meta-batch-size", str(args.meta_batch_size),
               "--size", str(args.size), "--model", args.model]
        for flag, value in (("--official-mwn", args.official_mwn), ("--official-cmwn", args.official_cmwn)):
            cmd += [flag, value] if value else []
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks mmapped: RSS follows live memory
        out[mode] = float(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.split()[0])
    return out


def report(args: argparse.Namespace, times: dict[str, list[tuple[float, float]]], mem: dict[str, float]) -> None:
    modes, base = modes_of(args), baseline_name(args)
    med = {m: statistics.median(w for w, _ in v) for m, v in times.items()}
    print(f"device={args.device} threads={args.threads} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"model={args.model} batch={args.batch_size} meta_batch={args.meta_batch_size} size={args.size} "
          f"repeats={args.repeats} torch={torch.__version__}")
    print(f"baseline ({base}): {LABELS[base]}")
    print(f"| mode | ms (median) | {base} / mode | mode / work floor | x ERM | CPU util median (min) "
          f"| peak working set MB | x {base} |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        util = [u for _, u in times[mode]]
        mem_txt = "- | -" if not mem else f"{mem[mode] / 2**20:.0f} | {mem[mode] / mem[base]:.2f}"
        print(f"| {mode} | {1000 * med[mode]:.1f} | {med[base] / med[mode]:.2f} | "
              f"{med[mode] / med['floor']:.2f} | {med[mode] / med['erm']:.2f} | "
              f"{100 * statistics.median(util):.0f}% ({100 * min(util):.0f}%) | {mem_txt} |")
    quiet = [r for r in range(args.repeats) if min(times[m][r][1] for m in modes) >= args.quiet_util]
    if quiet:  # rounds in which no mode was starved of CPU by other work on the machine
        qmed = {m: statistics.median(times[m][r][0] for r in quiet) for m in modes}
        print(f"quiet rounds only (every mode >= {100 * args.quiet_util:.0f}% CPU): {len(quiet)} of {args.repeats}; "
              f"baseline ({base}): {LABELS[base]}")
        _ratio_table(modes, base, qmed, "ms (median)")
    else:
        print(f"no round had every mode at >= {100 * args.quiet_util:.0f}% CPU: the machine was busy throughout")
    # the process's own CPU time: what the step costs when the cores are shared with other work (one thread)
    cmed = {m: statistics.median(w * u * args.threads for w, u in times[m]) for m in modes}
    print("medians of process CPU time (robust to other work on the machine; meaningful with one thread); "
          f"baseline ({base}): {LABELS[base]}")
    _ratio_table(modes, base, cmed, "CPU ms (median)")
    print("per repeat (ms, CPU util):")
    for mode in modes:
        print(f"  {mode:>18}: " + "  ".join(f"{1000 * w:.0f}/{100 * u:.0f}%" for w, u in times[mode]))


def _ratio_table(modes: tuple[str, ...], base: str, med: dict[str, float], unit: str) -> None:
    print(f"| mode | {unit} | {base} / mode | mode / work floor | x ERM |")
    print("|---|---|---|---|---|")
    for mode in modes:
        print(f"| {mode} | {1000 * med[mode]:.1f} | {med[base] / med[mode]:.2f} | "
              f"{med[mode] / med['floor']:.2f} | {med[mode] / med['erm']:.2f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-mwn", metavar="DIR",
                        help="checkout of github.com/xjtushujun/meta-weight-net: time its MW-Net.py train()")
    parser.add_argument("--official-cmwn", metavar="DIR",
                        help="checkout of github.com/xjtushujun/CMW-Net: its ACVNet as the weighting net (K=3)")
    parser.add_argument("--also-stand-in", action="store_true",
                        help="with the authors' code: also time the stand-in (tests/reference_official.py)")
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
    args = parser.parse_args(argv)
    if args.official_cmwn and not args.official_mwn:
        parser.error("--official-cmwn needs --official-mwn (the step timed is MW-Net.py's train())")
    if args.model != "cifar_resnet32" and args.official_mwn:
        parser.error("the authors' code trains their option-A ResNet-32: --model must be cifar_resnet32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        check_checkouts(args.official_mwn, args.official_cmwn)  # before any work: a wrong path is the user's error
        if args.memory_probe:
            print(peak_memory(args, args.memory_probe))
            return
        if args.official_mwn:
            check = check_against_authors(args)
            print(f"authors' code vs the toolkit (paper's order, float64, batch 8, meta batch 6, 16x16, K="
                  f"{3 if args.official_cmwn else 1}): net meta-gradient max abs diff "
                  f"{check['net_grad_max_abs_diff']:.1e} (largest entry {check['net_grad_max_abs']:.2g}), classifier "
                  f"after the step {check['classifier_max_abs_diff']:.1e} (largest {check['classifier_max_abs']:.2g})")
            if not agree(check):
                sys.exit("error: the authors' code and the toolkit disagree: the timing would compare different steps")
        times = time_modes(args)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    mem = {} if args.no_memory else memory(args)
    report(args, times, mem)


if __name__ == "__main__":
    gc.freeze()  # the imports' objects out of the per-mode gc.collect (then ms, not most of a second)
    main()

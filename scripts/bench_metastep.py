"""Meta-iteration cost vs a plain ERM step, side by side in one run (median of repeats), plus gradient fidelity.

For each model: the time of an ERM step (forward, backward, SGD step) and of a full meta-iteration (shared
forward, meta-gradient, weighting-net step, actual step) for ``exact``, ``skip:N`` and ``famus``; the amortised
iteration cost at ``--meta-interval`` k; the cosine of each approximate meta-gradient to the exact one at the same
state; and the peak memory of a step relative to ERM (CUDA: max_memory_allocated; CPU: peak RSS growth measured
in a fresh subprocess per mode). Timed in the same interleaved run: the **work floor** of an exact iteration
(train fwd+bwd + meta fwd+bwd + one plain forward; ``exact`` is reported against it), and the dual forward of the
exact meta-gradient alone (fused, and the reference ``torch.func.jvp``) against a plain forward of the same batch.
The **alternatives** for those per-sample directional derivatives (``derivative_alternatives.py``: the authors'
double backward on the shared training graph, reverse on a kept graph, a tangent-only pass over the training
forward's conv outputs) are timed alone and inside whole exact iterations (``exact[method]``, both orders), with
their peak memory, a float64 check against ``torch.func.jvp`` and the multiply-accumulate count that bounds any
exact pass.
The CPU column is process CPU time / (wall x threads): well below 100% means the machine was busy elsewhere;
``qN`` counts the repeats at >= ``--quiet-util``, and medians are taken over those when there are at least 3.
On a shared machine ``--clock cpu --threads 1`` times the process's own CPU time instead of the wall clock.

    OMP_NUM_THREADS=1 python scripts/bench_metastep.py --threads 1   # cifar_resnet32 and timm resnet18, 32x32
    OMP_NUM_THREADS=1 python scripts/bench_metastep.py --threads 1 --models cifar_resnet32 --repeats 7 \
        --cos-repeats 1 --clock cpu                                  # on a machine shared with other work
    python scripts/bench_metastep.py --device cuda --batch-size 128 --repeats 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.models import create_model, parameter_stages
from cmw_transfer.trainer.meta.metastep import (
    FamusGates,
    VirtualStep,
    forward_directional_derivatives,
    meta_gradient,
    reverse_directional_derivatives,
    virtual_names,
)
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import derivative_alternatives as alt

ALTERNATIVES = ("reverse-shared", "tape")  # other ways to the per-sample directional derivatives (see alt)


def build(model_name: str, batch_size: int, device: str, seed: int = 0, meta_batch_size: int = 100):
    torch.manual_seed(seed)
    model = create_model(model_name, 10, 3).to(device).train()
    wnet = CMWNet(num_heads=3).to(device)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    fam = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2], device=device)
    xm = torch.randn(meta_batch_size, 3, 32, 32, device=device)
    ym = torch.randint(0, 10, (meta_batch_size,), device=device)
    return model, wnet, TrainBatch(x, y, fam), xm, ym


def modes_for(model) -> dict[str, list[str]]:
    """exact (two orders of the real step), SLMO at two depths (last stage + classifier; classifier only), FaMUS."""
    stages = len(parameter_stages(model))
    exact = virtual_names(model, "exact")
    alternatives = {f"{order}[{method}]": exact for method in ALTERNATIVES for order in ("exact", "exact-updated")}
    return {"exact": exact, "exact-updated": exact,
            f"skip:{stages - 2}": virtual_names(model, "skip", stages - 2),
            f"skip:{stages - 1}": virtual_names(model, "skip", stages - 1),
            "famus": virtual_names(model, "famus"), **alternatives}


def make_step(mode: str, names: list[str] | None, model, wnet, batch, xm, ym):
    mode, _, method = mode.partition("[")  # "exact-updated[tape]": an exact iteration with another d method
    method = method.rstrip("]")
    updated = mode.endswith("-updated")
    mode = mode.removesuffix("-updated")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wopt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    objective = WeightedCE()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    gates = None
    if mode == "famus":
        head = names[-2:]
        gates = FamusGates({n: params[n].shape for n in names}, always_on=head).to(batch.x.device)

    def erm() -> None:
        loss = F.cross_entropy(model(batch.x), batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def floor() -> None:  # what no exact meta-iteration can skip
        ps = list(params.values())
        torch.autograd.grad(F.cross_entropy(model(batch.x), batch.y), ps)
        torch.autograd.grad(F.cross_entropy(model(xm), ym), ps)
        with torch.no_grad():
            model(batch.x)

    def plain_forward() -> None:
        with torch.no_grad():
            objective.terms(model(batch.x), batch)

    tangents = [torch.randn_like(params[n]) for n in virtual_names(model, "exact")]

    exact_names = virtual_names(model, "exact")

    def dual(fused: bool) -> None:
        forward_directional_derivatives(model, params, buffers, batch, objective, exact_names, tangents, fused=fused)

    # d alone by the alternatives; each is (untimed setup, timed part): the setup is what the iteration has anyway
    leaves = [params[n] for n in exact_names]

    def training_graph():
        terms = objective.terms(model(batch.x), batch)
        return terms, torch.ones_like(terms) / len(terms)

    def taped_forward():
        with torch.no_grad(), alt.ConvTape(model) as tape:
            model(batch.x)
        return tape.outputs

    def after_weighted_backward():
        terms, coeff = training_graph()
        torch.autograd.grad((coeff * terms).sum(), leaves, retain_graph=True)
        return terms

    pieces = {
        "d:weighted-backward": (training_graph, lambda s: torch.autograd.grad((s[1] * s[0]).sum(), leaves)),
        "d:reverse-shared": (training_graph, lambda s: alt.shared_reverse_derivatives(
            *alt.shared_reverse_backward(s[0], s[1], leaves), tangents)),
        "d:reverse": (after_weighted_backward, lambda terms: reverse_directional_derivatives(terms, leaves,
                                                                                            tangents)),
        "d:tape": (taped_forward, lambda outputs: alt.tangent_only_directional_derivatives(
            model, params, buffers, batch, objective, exact_names, tangents, outputs)),
    }
    if mode in pieces:
        return pieces[mode]
    if method:
        return lambda: alt.exact_iteration(method, model, wnet, batch, xm, ym, opt, wopt, 0.1,
                                           "updated" if updated else "reuse")

    def meta() -> None:
        logits = model(batch.x)
        terms = objective.terms(logits, batch)
        res = meta_gradient(model, wnet, params, buffers, batch, xm, ym, objective, VirtualStep(0.1), names,
                            gates=gates, train_out=(logits, terms), keep_graph=updated)
        for n, p in wnet.named_parameters():
            p.grad = res.wnet_grads[n]
        wopt.step()
        opt.zero_grad(set_to_none=True)
        if updated:  # the paper's order: re-weight with the updated net, backpropagate the kept graph again
            with torch.no_grad():
                coeff = objective.coefficients(wnet, terms.detach(), batch)
            (coeff * terms).sum().backward()
        else:  # reuse the gradient the meta step computed at the net it started from
            for n, p in params.items():
                p.grad = res.train_grads[n]
        opt.step()

    return {"erm": erm, "floor": floor, "forward": plain_forward, "dual": lambda: dual(True),
            "dual-jvp": lambda: dual(False)}.get(mode, meta)


def _kind(mode: str) -> str:
    return mode.split(":")[0] if mode.startswith("skip:") else mode


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PIECES = ("d:weighted-backward", "d:reverse-shared", "d:reverse", "d:tape")  # (setup, timed part) pairs
EXTRA = ("floor", "forward", "dual", "dual-jvp", *PIECES)  # timed only: not meta-iterations


def time_modes(model_name: str, args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved timing: every repeat runs each mode once, so drifts hit all modes alike. (times, CPU util)"""
    state = build(model_name, args.batch_size, args.device, meta_batch_size=args.meta_batch_size)
    model = state[0]
    init = {k: v.clone() for k, v in model.state_dict().items()}
    names = {"erm": None, **modes_for(model), **{m: None for m in EXTRA}}
    steps = {m: make_step(_kind(m), n, *state) for m, n in names.items()}
    steps = {m: fn if isinstance(fn, tuple) else (lambda: None, lambda _, fn=fn: fn()) for m, fn in steps.items()}
    for setup, fn in steps.values():  # warm-up
        for _ in range(args.warmup):
            fn(setup())
    times: dict[str, list[float]] = {m: [] for m in steps}
    util: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.repeats):
        for mode, (setup, fn) in steps.items():
            model.load_state_dict(init)
            state_of_setup = setup()
            gc.collect()
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(state_of_setup)
            del state_of_setup
            sync(args.device)
            wall = time.perf_counter() - t0
            times[mode].append(wall)
            util[mode].append((time.process_time() - c0) / (wall * args.threads))
    return times, util


def cosines(model_name: str, args) -> dict[str, float]:
    model, wnet, batch, xm, ym = build(model_name, args.batch_size, args.device, seed=1,
                                       meta_batch_size=args.meta_batch_size)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    out, exact = {}, None
    for mode, names in modes_for(model).items():
        gates = None
        if mode == "famus":
            gates = FamusGates({n: params[n].shape for n in names}, always_on=names[-2:]).to(args.device)
        vals = []
        for rep in range(args.cos_repeats):
            torch.manual_seed(rep)
            res = meta_gradient(model, wnet, params, buffers, batch, xm, ym, WeightedCE(), VirtualStep(0.1), names,
                                gates=gates)
            vals.append(torch.cat([g.flatten() for g in res.wnet_grads.values()]))
        if mode.startswith("exact"):
            exact = vals[0] if exact is None else exact
            continue
        out[mode] = statistics.median(float(F.cosine_similarity(exact, v, 0)) for v in vals)
    return out


def peak_memory(model_name: str, mode: str, args) -> tuple[float, float]:
    """(bytes a step needs above the steady state, bytes of the steady training state), in this fresh process.

    The steady state is what any training run holds between steps: weights, buffers, momentum (and on CUDA
    whatever else is allocated). Peak memory of a step = state + working set.
    """
    state = build(model_name, args.batch_size, args.device, meta_batch_size=args.meta_batch_size)
    names = {"erm": None, **modes_for(state[0])}
    fn = make_step(_kind(mode), names[mode], *state)
    if args.device.startswith("cuda"):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base), float(base)
    model = state[0]
    steady = sum(2 * p.numel() * p.element_size() for p in model.parameters())  # weights + momentum
    steady += sum(b.numel() * b.element_size() for b in model.buffers())
    # CPU: large blocks are mmapped (MALLOC_MMAP_THRESHOLD_ set by the parent), so RSS follows live memory;
    # clear_refs resets the kernel's high-water mark (VmHWM) right before the measured step.
    fn()
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return float((_status_kib("VmHWM") - base) * 1024), float(steady)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_ratios(model_name: str, modes: list[str], args) -> dict[str, tuple[float, float]]:
    """Per mode: (peak incl. the steady state, working set alone), each relative to the ERM step."""
    peaks = {}
    for mode in ["erm", *modes]:
        if args.device.startswith("cuda"):
            peaks[mode] = peak_memory(model_name, mode, args)
            continue
        cmd = [sys.executable, __file__, "--memory-probe", f"{model_name},{mode}", "--batch-size",
               str(args.batch_size), "--meta-batch-size", str(args.meta_batch_size), "--device", args.device,
               "--threads", str(args.threads)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.split()
        peaks[mode] = (float(out[0]), float(out[1]))
    work_erm, state = peaks["erm"]
    return {m: ((state + peaks[m][0]) / (state + work_erm), peaks[m][0] / work_erm) for m in modes}


def quiet_count(util: list[float], threshold: float) -> int:
    return sum(u >= threshold for u in util)


def quiet_median(times: list[float], util: list[float], threshold: float) -> float:
    """Median over the repeats that had the CPU (>= threshold); all repeats if fewer than 3 did."""
    quiet = [t for t, u in zip(times, util) if u >= threshold]
    return statistics.median(quiet if len(quiet) >= 3 else times)


def alternative_rows(model_name: str, med: dict, util: dict, mem: dict) -> list[str]:
    """The alternatives table: each way to d, alone and inside a whole exact iteration."""
    agree = alt.agreement(model_name, create_model)
    fwd, floor = med["forward"], med["floor"]
    cpu = {m: f"{100 * statistics.median(u):.0f}%" for m, u in util.items()}
    own = {"fused dual forward": med["dual"], "torch.func.jvp": med["dual-jvp"],
           "reverse-shared": med["d:reverse-shared"] - med["d:weighted-backward"], "reverse": med["d:reverse"],
           "tape": med["d:tape"]}
    piece = {"fused dual forward": "dual", "torch.func.jvp": "dual-jvp", "reverse-shared": "d:reverse-shared",
             "reverse": "d:reverse", "tape": "d:tape"}
    rows = []
    for method, t in own.items():
        its = {"fused dual forward": ("exact", "exact-updated")}.get(
            method, (f"exact[{method}]", f"exact-updated[{method}]") if method in ALTERNATIVES else None)
        if its:
            ratio = f"{med[its[0]] / floor:.2f} / {med[its[1]] / floor:.2f}"
            peak = f"{mem[its[0]][0] / mem['exact'][0]:.2f} / {mem[its[1]][0] / mem['exact-updated'][0]:.2f}"
            util_txt = f"{cpu[piece[method]]} / {cpu[its[0]]} / {cpu[its[1]]}"
        else:
            ratio = peak = "-"
            util_txt = cpu[piece[method]]
        diff = agree.get(method, 0.0 if method == "torch.func.jvp" else None)
        diff_txt = "reference" if method == "torch.func.jvp" else ("-" if diff is None else f"{diff:.0e}")
        rows.append(f"| {model_name} | {method} | {1000 * t:.1f} | {t / fwd:.2f} | {ratio} | {peak} | {diff_txt} | "
                    f"{util_txt} |")
    macs = alt.conv_macs(create_model(model_name, 10, 3), torch.randn(2, 3, 32, 32))
    plain = macs["conv"] + macs["linear"]
    tangent = 2 * plain - macs["conv_first"]
    rows.append(f"| {model_name} | MAC count per image | {plain / 1e6:.1f}M plain forward | recomputing dual "
                f"{(plain + tangent) / plain:.2f}x, tangent-only {tangent / plain:.2f}x | classifier share "
                f"{macs['linear'] / plain:.1e} | - | - | - |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cifar_resnet32,resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--meta-batch-size", type=int, default=100, help="100 = the paper's CIFAR-10 meta set")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cos-repeats", type=int, default=3)
    parser.add_argument("--meta-interval", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: wall-clock medians over the quiet repeats; cpu: medians of the process's CPU "
                             "time (for a machine shared with other work; one thread)")
    parser.add_argument("--quiet-util", type=float, default=0.9,
                        help="medians over the repeats of a mode with at least this CPU utilisation (all repeats "
                             "when fewer than 3 are): repeats starved by other work on the machine are left out")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        model_name, mode = args.memory_probe.split(",")
        print(*peak_memory(model_name, mode, args))
        return
    results = {}
    print(f"device={args.device} threads={args.threads} batch={args.batch_size} meta_batch={args.meta_batch_size} "
          f"repeats={args.repeats} clock={args.clock} quiet-util={args.quiet_util} "
          f"torch={torch.__version__}")
    print(f"| model | mode | step ms (median) | x ERM step | x ERM amortised (k={args.meta_interval}) | cos vs exact "
          "| peak mem x ERM (working set x ERM) | CPU util median (min) |")
    print("|---|---|---|---|---|---|---|---|")
    extra_rows, alt_rows = [], []
    for model_name in args.models.split(","):
        times, util = time_modes(model_name, args)
        if args.clock == "cpu":  # the process's own CPU time: robust to other work sharing the cores
            med = {m: statistics.median(t * u * args.threads for t, u in zip(v, util[m])) for m, v in times.items()}
        else:
            med = {m: quiet_median(v, util[m], args.quiet_util) for m, v in times.items()}
        cos = cosines(model_name, args)
        mem = memory_ratios(model_name, [m for m in med if m not in ("erm", *EXTRA)], args)
        k = args.meta_interval
        rows = {}
        cpu = {m: f"{100 * statistics.median(u):.0f}% ({100 * min(u):.0f}%) q{quiet_count(u, args.quiet_util)}"
               for m, u in util.items()}
        extra_rows.append(f"| {model_name} | {1000 * med['floor']:.1f} | {med['exact'] / med['floor']:.2f} | "
                          f"{med['exact-updated'] / med['floor']:.2f} | {1000 * med['forward']:.1f} | "
                          f"{med['dual'] / med['forward']:.2f} | {med['dual-jvp'] / med['forward']:.2f} | "
                          f"{cpu['floor']} / {cpu['dual']} / {cpu['dual-jvp']} |")
        alt_rows += alternative_rows(model_name, med, util, mem)
        for mode, t in med.items():
            if mode in EXTRA:
                continue
            ratio = t / med["erm"]
            amortised = (t + (k - 1) * med["erm"]) / (k * med["erm"])
            rows[mode] = {"ms": 1000 * t, "ratio": ratio, "amortised": amortised, "cos": cos.get(mode),
                          "mem": mem.get(mode)}
            cos_txt = "1 (reference)" if mode.startswith("exact") else ("-" if mode == "erm" else f"{cos[mode]:.3f}")
            mem_txt = "1 (1)" if mode == "erm" else f"{mem[mode][0]:.2f} ({mem[mode][1]:.2f})"
            print(f"| {model_name} | {mode} | {1000 * t:.1f} | {ratio:.2f} | {amortised:.2f} | {cos_txt} | "
                  f"{mem_txt} | {cpu[mode]} |")
        rows["floor"] = {"ms": 1000 * med["floor"], "exact_over_floor": med["exact"] / med["floor"],
                         "exact_updated_over_floor": med["exact-updated"] / med["floor"]}
        rows["dual"] = {"forward_ms": 1000 * med["forward"], "fused_over_forward": med["dual"] / med["forward"],
                        "jvp_over_forward": med["dual-jvp"] / med["forward"]}
        results[model_name] = rows
    print()
    print("Per-sample directional derivatives d_i = <grad l_i, v>: d alone (its own work beyond train fwd+bwd and "
          "meta fwd+bwd, x a plain forward of the batch; the work floor counts 1.00), a whole exact iteration with "
          "it (x work floor), its peak memory (x the fused dual forward's iteration, same order), exactness")
    print("| model | method | d ms | d x plain forward | iteration / floor (reuse / updated) | peak mem x fused "
          "(reuse / updated) | max rel diff vs jvp (float64) | CPU util d / reuse / updated |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(alt_rows))
    print()
    print("| model | work floor ms | exact / floor | exact-updated / floor | plain forward ms | fused dual forward / "
          "forward | torch.func.jvp / forward | CPU util floor / dual / jvp |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(extra_rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""One command that checks the CUDA path and measures it: correctness, speed, memory; one JSON report + a table.

    python scripts/device_check.py --out report.json                  # on a GPU (about 5-8 minutes on one H200)
    python scripts/device_check.py --out report.json --official-mwn meta-weight-net --official-cmwn CMW-Net
    python scripts/device_check.py --dry-run --out dry.json           # CPU, tiny sizes, CUDA parts skipped (<1 min)

Self-contained: the embedded digits, the shipped ``pretrained:cmwnet-digits-pmd`` net and synthetic tensors; no
network. Sections (docs/gpu.md says what each measures and the targets):

* correctness: the exact meta-gradient on CUDA vs CPU (K=1, K=3, option-A ResNet-32, float64, <= 1e-10) and vs
  the authors' step as the stand-in writes it; the fused dual forward vs ``torch.func.jvp`` (float64, <= 1e-10);
  one apply epoch under autocast bf16, fp16 with a GradScaler, and channels-last vs float32 (finite, mean training
  loss within 5% / 0.1%); ``torch.compile`` of the model in the apply step vs eager (1e-4);
* speed: apply step / ERM step (target <= 1.03x), exact meta-iteration vs the authors' step (target >= 2x;
  their code with ``--official-mwn`` / ``--official-cmwn``, else the stand-in, labelled) and vs the work floor,
  skip:N and FaMUS vs ERM, images/s of resnet18 at 32 and 224 px;
* memory: the memory check's estimate (a lower bound) vs ``torch.cuda.max_memory_allocated`` of a real step for
  three models and batch sizes (pass: measured / estimate in [1, 2]), and the check's CUDA branch itself.

Exit status: 0 when no check failed, 1 when one did (the report is written either way), 2 on bad input. A check
that raises is recorded as ``error`` with its message; the rest still run. ``--budget-s`` bounds the whole run:
speed items that would start after it are skipped (and say so).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network; never wait for it
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# the project's API and the benchmarks reused, in one place (a moved module is a one-line fix here)
import bench_apply  # noqa: E402
import bench_metastep  # noqa: E402
import bench_vs_reference  # noqa: E402
import device_check_correctness as corr  # noqa: E402
from authors_code import LoadError, check_checkouts  # noqa: E402

from cmw_transfer.artifact.net import CMWNet  # noqa: E402
from cmw_transfer.atomic import write_json  # noqa: E402
from cmw_transfer.models import create_model  # noqa: E402
from cmw_transfer.trainer.apply.steps import ApplyStepper  # noqa: E402
from cmw_transfer.trainer.engine.evaluation import amp_setup  # noqa: E402
from cmw_transfer.trainer.engine.memory import check_step_fits, estimate_step  # noqa: E402
from cmw_transfer.weighting import CMWLoss  # noqa: E402

FULL = {  # one H200: the whole run in about 5-8 minutes
    "meta_model": "cifar_resnet32", "batch": 32, "meta": 32, "size": 32,  # CUDA vs CPU meta-gradient, float64
    "dual_models": ("cifar_resnet32", "resnet18"), "dual_batch": 16,
    "apply_model": "cifar_resnet32", "apply_size": 32, "apply_batch": 128, "apply_limit": None, "compile_steps": 5,
    "repeats": 7, "warmup": 2, "steps": 10, "speed_model": "resnet18", "bench_batch": 256,
    "vs_model": "cifar_resnet32", "vs_batch": 64, "vs_meta": 100, "vs_size": 32, "meta_batch": 100,
    "throughput": ((32, 256), (224, 128)),
    "memory": (("cifar_resnet32", 256, 32), ("resnet18", 128, 224), ("mobilenetv3_large_100", 64, 224)),
}
DRY = {  # CPU, in the test suite: every code path, sizes that say nothing about speed
    "meta_model": "cifar_resnet20", "batch": 4, "meta": 4, "size": 8,
    "dual_models": ("cifar_resnet20",), "dual_batch": 4,
    "apply_model": "small_cnn", "apply_size": 8, "apply_batch": 32, "apply_limit": 64, "compile_steps": 2,
    "repeats": 1, "warmup": 0, "steps": 1, "speed_model": "small_cnn", "bench_batch": 4,
    "vs_model": "small_cnn", "vs_batch": 4, "vs_meta": 4, "vs_size": 8, "meta_batch": 4,
    "throughput": ((32, 4), (64, 2)),
    "memory": (("cifar_resnet32", 8, 32), ("resnet18", 4, 64), ("mobilenetv3_large_100", 4, 64)),
}

class Report:
    """Collects items per section; a check that raises becomes an ``error`` item and the run goes on."""

    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.sections: dict[str, list[dict[str, Any]]] = {"correctness": [], "speed": [], "memory": []}

    def run(self, section: str, name: str, fn: Callable[[], dict[str, Any]], *, budgeted: bool = False) -> None:
        t = time.perf_counter()
        if budgeted and t - self.t0 > self.budget_s:
            item: dict[str, Any] = {"status": "skipped", "detail": f"time budget of {self.budget_s:.0f} s spent"}
        else:
            try:
                item = fn()
            except Exception as exc:  # recorded, not fatal: one broken check must not cost the whole report
                item = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"[:500]}
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        item = {"name": name, **item, "seconds": round(time.perf_counter() - t, 2)}
        self.sections[section].append(item)
        print(f"  {section:<11} {name:<44} {item['status']:<8} {_headline(item)}", flush=True)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for items in self.sections.values():
            for item in items:
                out[item["status"]] = out.get(item["status"], 0) + 1
        return out


def _headline(item: dict[str, Any]) -> str:
    if "measured" in item and "tolerance" in item:
        return f"{item['measured']:.3g} (tolerance {item['tolerance']:.3g})"
    if "value" in item:
        target = f" (target {item['target']})" if item.get("target") else ""
        return f"{item['value']}{target}"
    return str(item.get("detail", ""))[:90]


def environment(device: str, dry_run: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                           "device": device, "dry_run": dry_run, "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return env


def correctness(rep: Report, device: str, s: dict[str, Any], args: argparse.Namespace) -> None:
    cuda = device == "cuda"
    for heads in (1, 3):
        rep.run("correctness", f"exact meta-gradient CUDA vs CPU, K={heads}",
                lambda h=heads: corr.meta_gradient_cuda_vs_cpu(h, s, cuda))
        rep.run("correctness", f"exact meta-gradient vs the authors' step, K={heads}",
                lambda h=heads: corr.meta_gradient_vs_stand_in(h, s, device))
    if args.official_mwn:
        rep.run("correctness", "exact iteration vs the authors' code", lambda: authors_code_check(args, device))
    for model in s["dual_models"]:
        rep.run("correctness", f"fused dual forward vs jvp, {model}",
                lambda m=model: corr.dual_forward_vs_jvp(m, s, device))
    data = corr._digits(device, s["apply_size"], s["apply_limit"])
    modes = ["bf16", "fp16", "channels-last"]
    for mode in modes:
        label = {"bf16": "autocast bf16", "fp16": "autocast fp16 + GradScaler", "channels-last": "channels-last"}[mode]
        rep.run("correctness", f"apply epoch, {label} vs fp32",
                lambda m=mode: corr.apply_epoch_vs_float32(s["apply_model"], data, device, s["apply_batch"], m))
    backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    small = corr._digits(device, 8, None)
    rep.run("correctness", f"torch.compile ({backend}) apply step vs eager",
            lambda: corr.compile_vs_eager(small, device, 64, s["compile_steps"], backend))


def authors_code_check(args: argparse.Namespace, device: str) -> dict[str, Any]:
    ns = bench_vs_reference.parse_args(_vs_argv(args, device, DRY))
    check = bench_vs_reference.check_against_authors(ns)
    rel = check["net_grad_max_abs_diff"] / max(check["net_grad_max_abs"], 1.0)
    return corr._verdict(rel, 1e-10, **check, detail="MW-Net.py train() (paper's order), float64")


def _vs_argv(args: argparse.Namespace, device: str, s: dict[str, Any]) -> list[str]:
    model = "cifar_resnet32" if args.official_mwn else s["vs_model"]  # the authors' code trains ResNet-32
    argv = ["--device", device, "--model", model, "--batch-size", str(s["vs_batch"]),
            "--meta-batch-size", str(s["vs_meta"]), "--size", str(s["vs_size"]), "--repeats", str(s["repeats"]),
            "--warmup", str(s["warmup"]), "--threads", str(torch.get_num_threads())]
    for flag, value in (("--official-mwn", args.official_mwn), ("--official-cmwn", args.official_cmwn)):
        argv += [flag, value] if value else []
    return argv


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def speed_apply(device: str, s: dict[str, Any]) -> dict[str, Any]:
    times = bench_apply.bench_steps(s["speed_model"], s["bench_batch"], 32, 10, s["repeats"], s["steps"], s["warmup"],
                                    torch.device(device))
    ratios = [c / e for c, e in zip(times["cmw"], times["erm"])]
    ratio = statistics.median(ratios)
    return {"status": "measured", "value": round(ratio, 3), "target": "<= 1.03", "met": ratio <= 1.03,
            "erm_ms": 1000 * statistics.median(times["erm"]), "apply_ms": 1000 * statistics.median(times["cmw"]),
            "cmw_sl_over_erm": round(statistics.median(t / e for t, e in zip(times["cmw_sl"], times["erm"])), 3),
            "detail": f"{s['speed_model']}, 32x32, batch {s['bench_batch']}, median of {s['repeats']} rounds"}


def speed_meta(args: argparse.Namespace, device: str, s: dict[str, Any]) -> dict[str, Any]:
    ns = bench_vs_reference.parse_args(_vs_argv(args, device, s))
    times = bench_vs_reference.time_modes(ns)
    med = {m: statistics.median(w for w, _ in v) for m, v in times.items()}
    base = bench_vs_reference.baseline_name(ns)
    speedup = med[base] / med["exact"]
    return {"status": "measured", "value": round(speedup, 3), "target": ">= 2", "met": speedup >= 2,
            "baseline": bench_vs_reference.LABELS[base], "ms": {m: round(1000 * t, 2) for m, t in med.items()},
            "exact_updated_speedup": round(med[base] / med["exact-updated"], 3),
            "exact_over_work_floor": round(med["exact"] / med["floor"], 3),
            "exact_over_exact_floor": round(med["exact"] / med["floor-exact"], 3),
            "baseline_over_exact_floor": round(med[base] / med["floor-exact"], 3),
            "detail": f"{ns.model}, batch {s['vs_batch']}, meta batch {s['vs_meta']}, {s['vs_size']}px, "
                      f"medians of {s['repeats']} interleaved rounds"}


def speed_skip_famus(device: str, s: dict[str, Any]) -> dict[str, Any]:
    state = bench_metastep.build(s["vs_model"], s["vs_batch"], device, meta_batch_size=s["meta_batch"])
    model = state[0]
    init = {k: v.clone() for k, v in model.state_dict().items()}
    names = {"erm": None, **{m: n for m, n in bench_metastep.modes_for(model).items() if "[" not in m}}
    steps = {m: bench_metastep.make_step(bench_metastep._kind(m), n, *state) for m, n in names.items()}
    for fn in steps.values():
        for _ in range(s["warmup"]):
            fn()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(s["repeats"]):
        for mode, fn in steps.items():
            model.load_state_dict(init)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[mode].append(time.perf_counter() - t0)
    erm = statistics.median(times["erm"])
    ratios = {m: round(statistics.median(t) / erm, 3) for m, t in times.items() if m != "erm"}
    return {"status": "measured", "value": ratios, "erm_ms": round(1000 * erm, 2),
            "detail": f"x ERM step; {s['vs_model']}, batch {s['vs_batch']}, meta batch {s['meta_batch']}"}


def speed_throughput(device: str, size: int, batch: int, s: dict[str, Any]) -> dict[str, Any]:
    """images/s of resnet18 training steps: ERM, apply (fp32), apply under --amp (the CLI's AMP for the device)."""
    amp_dtype, scaler = amp_setup(True, torch.device(device))
    times = bench_apply.bench_steps(s["speed_model"], batch, size, 10, s["repeats"], s["steps"], s["warmup"],
                                    torch.device(device))
    out = {f"{m}_images_per_s": round(batch / statistics.median(t)) for m, t in times.items() if m != "cmw_sl"}
    stepper = _amp_stepper(s["speed_model"], device, batch, size, amp_dtype, scaler)
    t_amp = [bench_apply._time_steps(stepper, s["steps"], torch.device(device)) for _ in range(s["repeats"])]
    out["apply_amp_images_per_s"] = round(batch / statistics.median(t_amp))
    return {"status": "measured", "value": out["cmw_images_per_s"], **out,
            "detail": f"{s['speed_model']} {size}x{size}, batch {batch}; value: apply step (fp32) images/s; "
                      f"AMP: {amp_dtype}, channels-last"}


def _amp_stepper(model_name: str, device: str, batch: int, size: int, amp_dtype: torch.dtype | None,
                 scaler: Any) -> Callable[[], Any]:
    dev = torch.device(device)
    model = create_model(model_name, 10, 3).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    idx = torch.arange(batch, device=dev)
    criterion = CMWLoss.from_net(CMWNet(hidden_size=100, num_heads=3), np.linspace(500, 50, 10).astype(int)).to(dev)
    stepper = ApplyStepper(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), criterion=criterion,
                           amp_dtype=amp_dtype, scaler=scaler)
    for _ in range(2):
        stepper(x, y, idx, True)
    return lambda: stepper(x, y, idx, True)


def memory_item(model_name: str, batch: int, size: int, device: str) -> dict[str, Any]:
    """The memory check's lower-bound estimate vs the measured peak of one real training step."""
    build = lambda: create_model(model_name, 10, 3)  # noqa: E731
    est = estimate_step(build, (3, size, size))
    if est is None:
        return {"status": "fail", "detail": "the estimate could not be made (model not traceable on meta)"}
    estimate = est.total(batch)
    if device != "cuda":
        return {"status": "skipped", "detail": "CUDA only (max_memory_allocated)", "estimate_bytes": estimate}
    checked = check_step_fits(build, model_name, (3, size, size), batch, torch.device("cuda"))
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = build().cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # momentum buffers exist from here on, as in any step after the first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    ratio = measured / estimate
    ok = 1.0 <= ratio <= 2.0 and checked == est  # and the check's CUDA branch ran (mem_get_info) and agreed
    return {"status": "pass" if ok else "fail", "value": round(ratio, 3), "target": "1 <= x <= 2",
            "estimate_bytes": estimate, "measured_bytes": measured, "cuda_branch_estimate_matches": checked == est,
            "detail": f"{model_name}, batch {batch}, {size}x{size}: measured / estimate"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("device_report.json"), help="the JSON report")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; CUDA parts skipped where there is none")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--official-mwn", metavar="DIR", help="checkout of github.com/xjtushujun/meta-weight-net")
    parser.add_argument("--official-cmwn", metavar="DIR", help="checkout of github.com/xjtushujun/CMW-Net")
    parser.add_argument("--compile-backend", help="default: inductor on CUDA, aot_eager on CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="speed items after this are skipped")
    parser.add_argument("--sections", default="correctness,speed,memory")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if device == "cpu" and not args.dry_run:
        parser.error("no CUDA device: the full check is for a GPU; on CPU run it with --dry-run")
    if args.official_cmwn and not args.official_mwn:
        parser.error("--official-cmwn needs --official-mwn (the step timed is MW-Net.py's train())")
    sections = set(args.sections.split(","))
    if not sections <= {"correctness", "speed", "memory"}:
        parser.error(f"--sections: a comma-separated subset of correctness,speed,memory, got '{args.sections}'")
    try:  # a wrong directory is the user's error: say so before anything runs
        check_checkouts(args.official_mwn, args.official_cmwn)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = DRY if args.dry_run else FULL
    rep = Report(args.budget_s)
    env = environment(device, args.dry_run)
    print(f"device check: {env.get('gpu', 'CPU')} | torch {env['torch']} | CUDA {env['cuda']} | dry run "
          f"{args.dry_run}", flush=True)
    if "correctness" in sections:
        correctness(rep, device, s, args)
    if "speed" in sections:
        rep.run("speed", "apply step / ERM step", lambda: speed_apply(device, s), budgeted=True)
        rep.run("speed", "exact meta-iteration vs the authors' step", lambda: speed_meta(args, device, s),
                budgeted=True)
        rep.run("speed", "skip:N and FaMUS vs ERM", lambda: speed_skip_famus(device, s), budgeted=True)
        for size, batch in s["throughput"]:
            rep.run("speed", f"images/s {s['speed_model']} {size}px",
                    lambda a=size, b=batch: speed_throughput(device, a, b, s), budgeted=True)
    if "memory" in sections:
        for model_name, batch, size in s["memory"]:
            rep.run("memory", f"estimate vs peak, {model_name} b{batch} {size}px",
                    lambda m=model_name, b=batch, z=size: memory_item(m, b, z, device))
    counts = rep.counts()
    report = {"schema": 1, "environment": env, **rep.sections,
              "summary": {**counts, "seconds": round(time.perf_counter() - rep.t0, 1)}}
    write_json(args.out, json.loads(json.dumps(report, default=float)))
    print(f"summary: {counts} in {report['summary']['seconds']} s; report: {args.out}")
    return 1 if counts.get("fail") or counts.get("error") else 0


if __name__ == "__main__":
    gc.freeze()  # the imports' objects (timm's registry, ...) out of every later gc.collect: ms, not 0.6 s
    sys.exit(main())

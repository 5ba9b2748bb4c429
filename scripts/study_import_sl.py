"""A converted CMW-Net-SL net in SL mode on digits: the net's own contribution vs mixup + teacher alone.

The authors' ``vnet_119.pth`` cannot be downloaded here, so the net under test is the shipped
``pretrained:cmwnet-sl-digits-pmd`` written out in the authors' exact state_dict format (``feature.layer.0.*``,
``classfier.layers.{0,1,2}.0.*``, heads in the authors' convention: official 0 = large, 1 = small, 2 = medium) and
imported back with ``cmw-transfer import --from official-cmwnet``, i.e. the path a user of the real file takes.
Every arm trains the same classifier with the same options on the same biased digits and is scored on the clean
test split (final epoch):

    erm          apply --weighting none                      plain cross-entropy
    sl-ones      apply --soft-labels --weighting none        every weight 1: the pseudo-label terms get weight 0,
                                                             so this is mixup alone (the teacher runs, unused)
    sl-half      apply --soft-labels --weights HALF          every weight 0.5 (a net whose heads output sigmoid(0)):
                                                             mixup + teacher pseudo-labels at a fixed half-half mix
    sl-imported  apply --soft-labels --weights IMPORTED      the same SL pipeline, weights from the converted net
    sl-shipped   apply --soft-labels --weights NET           the net before conversion (a check: must equal the above)

NET defaults to this checkout's ``pretrained/cmwnet-sl-digits-pmd`` directory (the net ``pretrained:`` ships), named
by path so that the run uses exactly that file; its sha256 is recorded. Every step is run through the CLI
(``python -m cmw_transfer``, from the repository root) exactly as printed, with OMP_NUM_THREADS=1.

    python scripts/study_import_sl.py      # ~2 minutes of CPU (4-7 minutes wall on a busy 2-core machine)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

ARMS = ("erm", "sl-ones", "sl-half", "sl-imported", "sl-shipped")


def cli(*args: str) -> dict:
    """One ``cmw-transfer`` command; its ``--json`` output."""
    cmd = [sys.executable, "-m", "cmw_transfer", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel(arg: str) -> str:
    """A path inside the repository as printed: relative to its root, where the commands run."""
    return arg.replace(f"{ROOT}{os.sep}", "")


def shown(args: list[str]) -> str:
    return "cmw-transfer " + " ".join(rel(a) for a in args)


def export_official(spec: str, path: Path) -> None:
    """The shipped net as the authors' state_dict (the inverse of the import's default head map)."""
    import torch

    from cmw_transfer.artifact.net import CMWNet
    from cmw_transfer.artifact.official import to_official_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_official_state_dict(CMWNet.from_pretrained(spec)), path)


def write_constant_net(path: Path, weight: float = 0.5) -> None:
    """A 3-head net whose every head outputs ``weight`` at every loss (zero head weights, bias = logit(weight))."""
    import math

    import torch

    from cmw_transfer.artifact.net import CMWNet

    net = CMWNet(hidden_size=1, num_heads=3)
    with torch.no_grad():
        net.trunk.weight.zero_()
        net.trunk.bias.zero_()
        net.heads.weight.zero_()
        net.heads.bias.fill_(math.log(weight / (1 - weight)))
    net = net.with_scales([1.0, 2.0, 3.0])
    net.provenance = {"source": f"constant weight {weight} (study baseline)", "method": "constant"}
    net.save_pretrained(path)


def max_curve_gap(a: str, b: str) -> float:
    import numpy as np

    from cmw_transfer.artifact.net import CMWNet

    grid = np.linspace(0.0, 12.0, 241)
    return float(np.abs(CMWNet.from_pretrained(a).curves(grid) - CMWNet.from_pretrained(b).curves(grid)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default=str(ROOT / "pretrained" / "cmwnet-sl-digits-pmd"))
    parser.add_argument("--source", default="digits-pmd", help="The net's meta-train source (for its counts).")
    parser.add_argument("--noise", default="asym:0.4")
    parser.add_argument("--imbalance", default="3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", default="15")
    parser.add_argument("--warmup-epochs", default="3")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--lr", default="0.05")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study_import_sl")
    args = parser.parse_args()
    out = args.out.resolve()
    net_file = Path(args.net) / "model.safetensors"
    net_sha = hashlib.sha256(net_file.read_bytes()).hexdigest() if net_file.is_file() else "n/a"
    start = time.perf_counter()
    commands: list[str] = []

    official_file = out / "vnet_official_format.pth"
    export_official(args.net, official_file)
    counts = cli("data", "--dataset", args.source, "--json")["class_counts"]
    imported = out / "imported"
    import_args = ["import", "--from", "official-cmwnet", str(official_file), "--out", str(imported),
                   "--source-counts", ",".join(map(str, counts)), "--overwrite", "--json"]
    cli(*import_args)
    commands.append(shown(import_args))
    gap = max_curve_gap(args.net, str(imported))
    half = out / "constant-half"
    write_constant_net(half)

    common = ["--dataset", "digits", "--noise", args.noise, "--imbalance", args.imbalance, "--model", args.model,
              "--epochs", args.epochs, "--warmup-epochs", args.warmup_epochs, "--batch-size", args.batch_size,
              "--lr", args.lr, "--workers", "0", "--no-progress", "--overwrite", "--json"]
    arm_args = {
        "erm": ["--weighting", "none"],
        "sl-ones": ["--soft-labels", "--weighting", "none"],
        "sl-half": ["--soft-labels", "--weights", str(half)],
        "sl-imported": ["--soft-labels", "--weights", str(imported)],
        "sl-shipped": ["--soft-labels", "--weights", args.net],
    }
    seeds = [s.strip() for s in args.seeds.split(",")]
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for arm in ARMS:
        for seed in seeds:
            run_args = ["apply", *arm_args[arm], *common, "--seed", seed, "--out", str(out / f"{arm}-{seed}")]
            acc = float(cli(*run_args)["final"]["test_top1"])
            results[arm].append(acc)
            commands.append(shown(run_args))
            print(f"{arm:<12} seed {seed}: {acc:.2f}", file=sys.stderr)
    seconds = time.perf_counter() - start
    (out / "study.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                "net_sha256": net_sha, "curve_gap": gap, "results": results,
                                                "commands": commands, "seconds": seconds}, indent=2))

    print(f"digits --noise {args.noise} --imbalance {args.imbalance}, {args.model}, {args.epochs} epochs "
          f"({args.warmup_epochs} CE warm-up); clean test top-1 (%), final epoch ({seconds:.0f} s)")
    print(f"net {rel(args.net)} (model.safetensors sha256 {net_sha[:16]}...); converted vs original: max "
          f"|weight difference| on a 0..12 loss grid = {gap:.2e}\n")
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for arm in ARMS:
        accs = results[arm]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells = " | ".join(f"{a:.2f}" for a in accs)
        print(f"| {arm} | {cells} | {statistics.mean(accs):.2f} ± {std:.2f} |")
    net = statistics.mean(results["sl-imported"])
    print(f"\nthe net's own contribution: {net - statistics.mean(results['sl-ones']):+.2f} points over all weights 1 "
          f"(mixup alone), {net - statistics.mean(results['sl-half']):+.2f} over a constant 0.5 (mixup + teacher)")
    print("\ncommands:\n" + "\n".join(commands))


if __name__ == "__main__":
    main()

"""How long ``cmw-transfer [COMMAND] --help`` takes, and which heavy libraries it imports (goal: <= 1 s, none).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cli_help.py            # 7 repeats per command
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cli_help.py --repeats 3

Each command runs in a fresh interpreter (what a user's shell does); the median of the repeats is reported next
to a bare ``python -c pass`` so the interpreter's own start-up is visible.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = ([], ["inspect"], ["push"], ["data"], ["apply"], ["metatrain"], ["probe"], ["import"])
HEAVY = ("torch", "sklearn", "huggingface_hub", "timm", "matplotlib", "numpy")
PROBE = (
    "import sys, atexit\n"
    "atexit.register(lambda: print('imported:', ','.join(m for m in {heavy!r} if m in sys.modules) or 'none', "
    "file=sys.stderr))\n"
    "from cmw_transfer.cli import main\n"
    "main({args!r})\n"
)


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def heavy_imports(args: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, args=[*args, "--help"])],
                         capture_output=True, text=True, check=False)
    lines = [line for line in out.stderr.splitlines() if line.startswith("imported:")]
    return lines[-1].split(":", 1)[1].strip() if lines else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    base = statistics.median(wall([sys.executable, "-c", "pass"]) for _ in range(args.repeats))
    print(f"{'command':<28}{'median s':>10}{'max s':>8}  heavy imports   (python -c pass: {base:.3f} s)")
    for cmd in COMMANDS:
        times = [wall([sys.executable, "-m", "cmw_transfer", *cmd, "--help"]) for _ in range(args.repeats)]
        label = " ".join(["cmw-transfer", *cmd, "--help"])
        print(f"{label:<28}{statistics.median(times):>10.3f}{max(times):>8.3f}  {heavy_imports(list(cmd))}")


if __name__ == "__main__":
    main()

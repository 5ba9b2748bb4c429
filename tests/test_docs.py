"""Executable documentation: every code block of README.md and docs/*.md runs as written, or says why not.

How a block is treated:

* ```bash: the file's commands run in order in an empty working directory, with the virtualenv's ``bin`` first on
  PATH (so ``cmw-transfer`` is the installed command); then
* ```python: the file's Python blocks run in order in one fresh interpreter (one namespace, like a notebook),
  verbatim, in the same directory (so they can read what the commands wrote).
* The ONLY change made to a command is SMOKE below: training commands get ``--epochs`` capped (or added), so the
  suite stays fast; each command is printed as run.
* A block preceded by ``<!-- doc-test: skip: REASON -->`` (a GPU, data that cannot be downloaded here, the network)
  is not run: Python is compiled, and each ``cmw-transfer`` / ``python -m cmw_transfer`` / ``torchrun ... -m
  cmw_transfer`` command has its options parsed and validated by the real click command; scripts must exist
  (``bash -n`` for shell scripts).
* The README's two set-up commands are not run here: ``.ci/run`` runs them, which a test checks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The only substitution: at most this many epochs for every training command (added where a command has none).
SMOKE = {"--epochs": 2, "--oltr-stage1-epochs": 1, "--oltr-stage2-epochs": 1}
ADDED = ("--epochs",)
PROBE_EPOCHS = 8  # a probe must outlast CurveNet's skipped first epochs (5 by default) by at least 2
TRAINING = ("metatrain", "apply", "probe", "import")
CI_COMMANDS = ("bash scripts/demo.sh", "bash scripts/bootstrap.sh && .venv/bin/python -m pytest")
FENCE = re.compile(r"^(?P<marker><!-- doc-test: skip: (?P<why>[^>]*)-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```",
                   re.M | re.S)


def blocks(path: Path, lang: str) -> list[tuple[str, str | None]]:
    return [(m["body"], m["why"]) for m in FENCE.finditer(path.read_text()) if m["lang"] == lang]


def commands(body: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    text = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def cmw_args(command: str) -> list[str] | None:
    """The arguments after the toolkit's command name, for any of the ways to invoke it; else None."""
    words = shlex.split(command)
    if words[:1] == ["cmw-transfer"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "cmw_transfer":
            return words[i + 2:]
    return None


def smoke(command: str) -> str:
    args = cmw_args(command)
    if args is None or not args or args[0] not in TRAINING:
        return command
    for option, cap in SMOKE.items():
        if option == "--epochs" and args[0] == "probe":
            cap = PROBE_EPOCHS
        pattern = re.compile(rf"(?<![\w-]){option}[ =](\d+)")
        if pattern.search(command):
            command = pattern.sub(lambda m, option=option, cap=cap: f"{option} {min(int(m[1]), cap)}", command)
        elif option in ADDED and args[0] in ("metatrain", "apply", "probe"):
            command = f"{command} {option} {cap}"
    return command


def parse_only(command: str) -> None:
    """Validate a command that cannot run here: the real click command parses its options."""
    args = cmw_args(command)
    words = shlex.split(command)
    if args is not None:
        from cmw_transfer.cli import cli

        assert args, f"no subcommand in {command!r}"
        sub = cli.get_command(click.Context(cli), args[0])
        assert sub is not None, f"unknown subcommand in {command!r}"
        if "$" in command:  # options come from shell variables set elsewhere: the subcommand is what we can check
            return
        try:
            sub.make_context(args[0], args[1:])
        except click.BadParameter as exc:  # paths that exist only on the machine the block is for
            if "does not exist" not in str(exc):
                raise
        return
    if words[:1] == ["bash"] and words[1].startswith("scripts/"):
        assert subprocess.run(["bash", "-n", str(REPO / words[1])]).returncode == 0, command
        return
    if words[:1] == ["python"] and words[1].startswith("scripts/"):
        assert (REPO / words[1]).is_file(), command
        return
    if words[:2] in (["pip", "install"], ["hf", "auth"]) or words[:1] == ["export"]:
        return
    raise AssertionError(f"cannot check {command!r}: make it a cmw-transfer command or a script")


def _env(cwd: Path) -> dict[str, str]:
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


SHELL_SETTING = re.compile(r"^(export )?\w+=")


def run_block(lines: list[str], cwd: Path) -> None:
    """One block as one bash script (its variables carry from line to line), stopping at the first failure."""
    script = "set -euo pipefail\n" + "\n".join(f"echo '$ '{shlex.quote(line)} >&2\n{line}" for line in lines)
    out = subprocess.run(["bash", "-c", script], cwd=cwd, env=_env(cwd), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-4000:]}"


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


READ_ONLY = ("cat", "ls", "head", "tail")  # harmless shell commands a doc may use to show a result


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_blocks_run_as_written(doc, tmp_path):
    """The doc's shell commands in order, then its Python blocks, in one working directory (as a reader would)."""
    for body, skip in blocks(doc, "bash"):
        lines = [c for c in commands(body) if c not in CI_COMMANDS]
        if skip is not None:
            for command in lines:
                if not SHELL_SETTING.match(command) and shlex.split(command)[0] not in READ_ONLY:
                    parse_only(command)
            continue
        for command in lines:
            assert (cmw_args(command) is not None or SHELL_SETTING.match(command)
                    or shlex.split(command)[0] in READ_ONLY), \
                f"{doc_id(doc)}: {command!r} is neither runnable here nor marked <!-- doc-test: skip: REASON -->"
        if lines:
            run_block([smoke(command) for command in lines], tmp_path)
    runnable = []
    for body, skip in blocks(doc, "python"):
        compile(body, f"{doc_id(doc)} block", "exec")
        if skip is None:
            runnable.append(body)
    if not runnable:
        return
    script = tmp_path / "doc_blocks.py"
    script.write_text("\n\n".join(runnable))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"{doc_id(doc)}: its Python blocks fail:\n{out.stderr[-3000:]}"


def test_ci_runs_the_readme_set_up_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in CI_COMMANDS:
        assert command in readme, f"README lost its set-up command {command!r}"
        assert command in ci, f".ci/run does not run the README's {command!r}"


def test_smoke_is_the_only_substitution():
    assert smoke("cmw-transfer apply --epochs 30 --out r") == "cmw-transfer apply --epochs 2 --out r"
    assert smoke("cmw-transfer metatrain --src digits-pmd --out r") == \
        "cmw-transfer metatrain --src digits-pmd --out r --epochs 2"
    assert smoke("cmw-transfer inspect --weights r") == "cmw-transfer inspect --weights r"

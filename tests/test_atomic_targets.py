"""Atomic writes replace only regular files; a symlink is written through; every output is 0644 under umask 022
(issue 22, item 2). Devices and FIFOs are made in a temporary folder, never in the real /dev."""

from __future__ import annotations

import ast
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from cmw_transfer.atomic import atomic_path, check_regular, write_text
from cmw_transfer.errors import UserError
from tests.helpers import call_main, make_net

ROOT = Path(__file__).resolve().parents[1]


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _device(path: Path) -> Path:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is, made here
    except PermissionError:
        pytest.skip("mknod of a character device needs root (CAP_MKNOD)")
    return path


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.fixture
def short_tmp():
    """A short folder: a unix socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="cmw-") as tmp:
        yield Path(tmp)


@pytest.fixture
def umask022():
    saved = os.umask(0o022)
    yield
    os.umask(saved)


@pytest.mark.parametrize(("make", "kind", "test"), [
    (_fifo, "a FIFO (named pipe)", stat.S_ISFIFO),
    (_device, "a character device", stat.S_ISCHR),
    (_socket, "a socket", stat.S_ISSOCK),
    (lambda p: p.mkdir() or p, "a directory", stat.S_ISDIR),
])
def test_a_non_regular_target_is_refused_and_left_alone(short_tmp, make, kind, test):
    target = make(short_tmp / "out.png")
    with pytest.raises(UserError, match=re.escape(f"cannot write {target}: it is {kind}, not a regular file")) as exc:
        write_text(target, "a PNG")
    assert "\n" not in str(exc.value)
    assert test(os.lstat(target).st_mode)
    assert sorted(p.name for p in short_tmp.iterdir()) == ["out.png"]  # no temporary left behind
    with pytest.raises(UserError, match=re.escape(kind)):
        check_regular(target)


def test_a_target_swapped_for_a_fifo_during_the_write_is_not_replaced(tmp_path):
    """The check is repeated right before the rename: a FIFO planted while the file was written stays."""
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(UserError, match="it is a FIFO"):
        with atomic_path(target) as tmp:
            tmp.write_text("new\n")
            target.unlink()
            _fifo(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_a_symlink_is_written_through_and_kept(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "curves.png").write_text("old")
    link = tmp_path / "run" / "curves.png"
    link.parent.mkdir()
    link.symlink_to("../shared/curves.png")
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == "../shared/curves.png"
    assert (shared / "curves.png").read_text() == "new"
    assert not list(tmp_path.rglob(".*.tmp"))
    dangling = tmp_path / "run" / "dangling.json"
    dangling.symlink_to(shared / "created.json")
    write_text(dangling, "{}")
    assert dangling.is_symlink() and (shared / "created.json").read_text() == "{}"


def test_a_symlink_to_a_non_regular_file_or_a_loop_is_refused(short_tmp):
    fifo = _fifo(short_tmp / "pipe")
    link = short_tmp / "out.png"
    link.symlink_to(fifo)
    with pytest.raises(UserError, match=rf"cannot write {link} \(a symbolic link to {fifo}, which is a FIFO"):
        write_text(link, "x")
    assert link.is_symlink() and stat.S_ISFIFO(os.stat(link).st_mode)
    loop = short_tmp / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match=rf"cannot write {loop}: Too many levels of symbolic links"):
        write_text(loop, "x")


def test_import_never_replaces_a_fifo_in_or_as_its_out(tmp_path):
    from cmw_transfer.artifact.official import save_official

    out = tmp_path / "imported"
    save_official(make_net(), out)
    before = (out / "model.safetensors").read_bytes()
    (out / "curves.png").unlink()
    _fifo(out / "curves.png")
    with pytest.raises(UserError, match=re.escape(f"cannot write {out / 'curves.png'}: it is a FIFO")):
        save_official(make_net(seed=1), out, overwrite=True)
    assert stat.S_ISFIFO(os.lstat(out / "curves.png").st_mode)
    assert (out / "model.safetensors").read_bytes() == before  # all or nothing
    with pytest.raises(UserError, match=re.escape(f"--out {out / 'curves.png'} is a FIFO (named pipe), not a dir")):
        save_official(make_net(), out / "curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]  # no temporary folder left behind


@pytest.mark.parametrize("command", [
    ["data", "--dataset", "digits", "--plot"],
    ["inspect", "--weights", "pretrained:cmwnet-digits-pmd", "--plot"],
])
@pytest.mark.parametrize("make", [_fifo, _device], ids=["fifo", "device"])
def test_cli_plot_onto_a_device_or_fifo_is_one_line(short_tmp, capsys, command, make):
    target = make(short_tmp / "plot.png")
    code, _, err = call_main([*command, str(target)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: cannot write {target}: it is a "), err
    assert not stat.S_ISREG(os.lstat(target).st_mode)


def test_safetensors_outputs_get_the_umask_mode(tmp_path, umask022):
    """safetensors' save_file / save_model re-create the file 0600; the atomic write restores 0666 - umask."""
    from safetensors.torch import save_file, save_model

    with atomic_path(tmp_path / "a.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    with atomic_path(tmp_path / "b.safetensors") as tmp:
        save_model(torch.nn.Linear(2, 2), str(tmp))
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == \
        {"a.safetensors": 0o644, "b.safetensors": 0o644}


def test_every_output_of_a_run_and_an_import_is_0644(tmp_path, capsys, umask022):
    code, _, err = call_main(["apply", "--dataset", "digits", "--weighting", "none", "--model", "small_cnn",
                              "--epochs", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--out",
                              str(tmp_path / "run")], capsys)
    assert code == 0, err
    from cmw_transfer.artifact.official import save_official

    save_official(make_net(), tmp_path / "imported")
    modes = {p.relative_to(tmp_path).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.rglob("*")}
    assert "run/classifier.safetensors" in modes and "imported/model.safetensors" in modes
    assert modes == {name: oct(0o755 if (tmp_path / name).is_dir() else 0o644) for name in modes}


# -- every writer of the package goes through atomic_path ---------------------------------------------------------
WRITERS = {"savefig", "save", "save_file", "save_model", "tofile", "to_csv", "copyfile", "SummaryWriter"}
PATH_WRITERS = {"write_text", "write_bytes"}  # as methods (Path.write_text); the bare names are atomic's own
# writers that cannot be atomic by nature, each checked or created fresh: (file, function) -> why
IN_PLACE = {
    ("cmw_transfer/metrics/log.py", "append"): "one row appended to metrics.jsonl, which __init__ wrote atomically",
    ("cmw_transfer/trainer/engine/rundir.py", "_lock"): "the .lock file: opened O_RDWR, refused unless a regular file",
    ("cmw_transfer/trainer/curvenet/probe.py", "start"): "the loss memmap is written in place; check_regular() first",
    ("cmw_transfer/metrics/loggers.py", "__init__"): "TensorBoard's SummaryWriter: new, uniquely named files",
}


def _writes(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, function, call) of every file write not lexically inside ``with atomic_path(...)``."""
    found = []

    def visit(node: ast.AST, function: str, atomic: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.With | ast.AsyncWith) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "atomic_path"
                for i in node.items):
            atomic = True
        if isinstance(node, ast.Call) and not atomic:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            writes_mode = isinstance(mode, ast.Constant) and isinstance(mode.value, str) and \
                any(c in mode.value for c in "wax+")
            flags = ast.unparse(node.args[1]) if name == "open" and len(node.args) > 1 else ""
            if name in WRITERS or (name in PATH_WRITERS and isinstance(func, ast.Attribute)) or \
                    (name in ("open", "open_memmap") and (writes_mode or "O_CREAT" in flags or "O_WR" in flags)):
                found.append((node.lineno, function, ast.unparse(node)[:80]))
        for child in ast.iter_child_nodes(node):
            visit(child, function, atomic)

    visit(tree, "<module>", False)
    return found


def test_every_writer_in_the_package_goes_through_atomic_path():
    unexpected, used = [], set()
    for path in sorted((ROOT / "cmw_transfer").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name == "cmw_transfer/atomic.py":
            continue
        for line, function, call in _writes(ast.parse(path.read_text(encoding="utf-8"))):
            if (name, function) not in IN_PLACE:
                unexpected.append(f"{name}:{line} in {function}: {call}")
            used.add((name, function))
    assert unexpected == [], "\n".join(unexpected)
    assert used >= set(IN_PLACE)  # no stale exception


def test_the_writer_scan_finds_a_plain_write():
    tree = ast.parse("def f(p):\n    open(p, 'w').write('x')\n    fig.savefig(p)\n    np.save(p, a)\n"
                     "    with atomic_path(p) as t:\n        fig.savefig(t)\n")
    assert [(line, fn) for line, fn, _ in _writes(tree)] == [(2, "f"), (3, "f"), (4, "f")]
    assert _writes(ast.parse("write_text(p, 'x')\nopen_memmap(p, mode='r')\nPath(p).write_bytes(b)\n")) == \
        [(3, "<module>", "Path(p).write_bytes(b)")]

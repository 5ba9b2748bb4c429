"""Bad numbers, devices and outputs: one ``error:`` line and exit 2, before any data or model is touched."""

from __future__ import annotations

import errno
import os
import random
import subprocess

import click
import pytest
import torch

from cmw_transfer.atomic import atomic_path, write_text
from cmw_transfer.cli.apply_cmd import apply_cmd
from cmw_transfer.cli.data_cmd import data_cmd
from cmw_transfer.cli.metatrain_cmd import metatrain_cmd
from cmw_transfer.cli.options import DEVICE, FLOAT32_MAX, MAX_IMG_SIZE, FiniteFloat
from cmw_transfer.cli.text import printable
from cmw_transfer.errors import UserError
from tests.helpers import call_main, make_net, one_error_line

APPLY = ["apply", "--dataset", "digits", "--weighting", "none", "--model", "small_cnn", "--epochs", "1",
         "--workers", "0", "--no-progress"]


# -- the types --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "+Infinity", "1e39", "-1e308", "abc", ""])
def test_finite_float_refuses_non_finite_and_unrepresentable(text):
    with pytest.raises(click.BadParameter):
        FiniteFloat().convert(text, None, None)


@pytest.mark.parametrize(("low", "high", "min_open", "max_open"), [(0.0, 1.0, False, True), (0.0, None, True, False),
                                                                    (1.0, None, False, False), (-2.0, 3.0, True, True)])
def test_finite_float_range_matches_the_interval(low, high, min_open, max_open):
    kind = FiniteFloat(low, high, min_open=min_open, max_open=max_open)
    rng = random.Random(0)
    for value in [low, high, *(rng.uniform(-5, 5) for _ in range(200))]:
        if value is None:
            continue
        inside = (value > low if min_open else value >= low) and (
            high is None or (value < high if max_open else value <= high))
        if inside:
            assert kind.convert(repr(value), None, None) == value
        else:
            with pytest.raises(click.BadParameter):
                kind.convert(repr(value), None, None)


def test_finite_float_takes_float32_max_but_no_more():
    assert FiniteFloat().convert(str(FLOAT32_MAX), None, None) == FLOAT32_MAX
    with pytest.raises(click.BadParameter, match="too large"):
        FiniteFloat().convert("3.5e38", None, None)


@pytest.mark.parametrize("text", ["meta", "garbage", "xla", "cuda:", "cuda:-1", "cuda:99999", "CPU", ""])
def test_device_refuses_what_training_cannot_run_on(text):
    with pytest.raises(click.BadParameter):
        DEVICE.convert(text, None, None)


def test_device_accepts_auto_and_cpu_and_checks_cuda_here():
    assert DEVICE.convert("auto", None, None) == "auto" and DEVICE.convert(" cpu ", None, None) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(click.BadParameter, match="CUDA is not available"):
            DEVICE.convert("cuda", None, None)


@pytest.mark.parametrize("command", [apply_cmd, metatrain_cmd, data_cmd], ids=lambda c: c.name)
def test_every_numeric_option_is_validated(command):
    """No option of the training and data commands takes a bare float or int (which would accept nan, inf or
    a seed of 10**40)."""
    for param in command.params:
        if isinstance(param.type, click.types.FloatParamType):
            assert isinstance(param.type, FiniteFloat), param.name
        if isinstance(param.type, click.types.IntParamType):
            assert isinstance(param.type, click.IntRange) and param.type.min is not None, param.name
            assert param.type.max is not None, param.name


# -- the commands -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e308"], ["--momentum", "nan"], ["--focal-gamma", "nan"],
    ["--focal-gamma", "-1"], ["--cb-beta", "1.5"], ["--mixup-alpha", "nan"], ["--weight-decay", "-1"],
    ["--teacher-decay", "2"], ["--seed", str(2**63)], ["--seed", "-1"], ["--img-size", "0"], ["--img-size", "-5"],
    ["--img-size", str(MAX_IMG_SIZE + 1)], ["--device", "meta"], ["--device", "garbage"], ["--nproc", "0"],
    ["--nproc", "2", "--lr", "nan"], ["--nproc", "2", "--dataset", "nope"], ["--nproc", "2", "--noise", "bogus:1"],
], ids=" ".join)
def test_apply_refuses_before_loading_anything(capsys, tmp_path, no_work, args):
    code, out, err = call_main([*APPLY, "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert args[-2].lstrip("-") in line or "noise" in line or "unknown dataset" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--meta-lr", "nan"], ["--lr", "inf"], ["--ema-decay", "2"],
                                  ["--weight-decay", "-1"], ["--seed", str(2**64)], ["--device", "meta"],
                                  ["--hidden-size", "0"], ["--mixup-alpha", "-inf"]], ids=" ".join)
def test_metatrain_refuses_before_loading_anything(capsys, tmp_path, no_work, args):
    code, out, err = call_main(["metatrain", "--src", "digits-pmd", "--out", str(tmp_path / "m"), *args], capsys)
    assert code == 2 and out == "" and f"'{args[0]}'" in one_error_line(err)


def test_the_largest_documented_values_are_accepted(capsys, tmp_path, monkeypatch):
    """The bounds are inclusive where documented: the command reaches the trainer with them."""
    import cmw_transfer.trainer.engine.launch as launch_mod

    seen = {}

    def fake_run(cfg):
        seen.update(cfg.to_dict())
        raise UserError("stop here")

    monkeypatch.setattr(launch_mod, "run_stage", fake_run)
    code, _, err = call_main([*APPLY, "--out", str(tmp_path / "r"), "--seed", str(2**63 - 1), "--img-size",
                              str(MAX_IMG_SIZE), "--cb-beta", "0", "--momentum", "0.999", "--lr", "100"], capsys)
    assert code == 2 and "stop here" in err
    assert seen["seed"] == 2**63 - 1 and seen["img_size"] == MAX_IMG_SIZE and seen["lr"] == 100.0


# -- printable --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"), ("a\nforged: b", "a\\nforged: b"), ("tab\there", "tab\\there"),
    ("\x9b31m", "\\x9b31m"), ("\x7f", "\\x7f"), ("abc\u202etxt.exe", "abc\\u202etxt.exe"), ("\u2028", "\\u2028"),
    ("Zürich 東京 ok", "Zürich 東京 ok"), ("C:\\path", "C:\\path"),
])
def test_printable_escapes_what_drives_a_terminal(raw, shown):
    assert printable(raw) == shown


def test_printable_with_escaped_backslashes_round_trips():
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(chr(rng.choice([rng.randrange(0, 0xA0), 0x5C, 0x41])) for _ in range(rng.randrange(0, 30)))
        shown = printable(text, escape_backslash=True)
        assert shown.isascii() and shown.isprintable()
        assert shown.encode("ascii").decode("unicode_escape") == text


def test_inspect_escapes_hostile_provenance(capsys, tmp_path):
    net = make_net()
    net.provenance = {"source": "\x1b[2J\x1b[31mred", "note": "x\nforged: line", "\x1b[1mkey": "v"}
    net.save_pretrained(tmp_path / "net")
    code, out, _ = call_main(["inspect", "--weights", str(tmp_path / "net")], capsys)
    assert code == 0 and "\x1b" not in out
    assert "\\x1b[2J\\x1b[31mred" in out and "x\\nforged: line" in out
    assert not any(line.startswith("forged") for line in out.splitlines())


def test_error_and_warning_lines_escape_control_characters(capsys):
    code, _, err = call_main(["data", "--dataset", "list:\x1b[2Jnope.txt"], capsys)
    assert code == 2 and "\x1b" not in err and "\\x1b[2J" in one_error_line(err)


# -- failed writes ----------------------------------------------------------------------------------------------
def _raise(exc):
    def boom(*args, **kwargs):
        raise exc
    return boom


def test_atomic_write_failure_names_the_path_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.json"
    write_text(target, "old\n")
    with pytest.raises(UserError, match=rf"cannot write {target}: No space left on device$"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_torch_save_failure_is_a_write_error(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    message = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
               "file write failed")
    monkeypatch.setattr(torch, "save", _raise(RuntimeError(message)))
    with pytest.raises(UserError, match=rf"cannot write {target}: .*file write failed"):
        with atomic_path(target) as tmp:
            torch.save({"x": 1}, tmp)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_safetensors_write_failure_is_a_write_error(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    target = tmp_path / "model.safetensors"
    failure = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", _raise(failure))
    with pytest.raises(UserError, match=rf"cannot write {target}: .*No space left on device"):
        with atomic_path(target) as tmp:
            safetensors.torch.save_file({"x": torch.zeros(1)}, tmp)
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(SafetensorError, match="header too large"), atomic_path(tmp_path / "y") as _:
        raise SafetensorError("header too large")  # not a write failure: a bug stays a bug


def test_other_runtime_errors_are_not_mistaken_for_write_errors(tmp_path):
    with pytest.raises(RuntimeError, match="a real bug"), atomic_path(tmp_path / "x") as _:
        raise RuntimeError("a real bug")


def test_unwritable_plot_is_one_line(capsys):
    code, _, err = call_main(["data", "--dataset", "digits", "--plot", "/proc/cmw-test/x.png"], capsys)
    assert code == 2 and one_error_line(err).startswith("error: cannot write /proc/cmw-test/x.png: ")


def test_os_errors_map_to_exit_2_only_when_they_are_about_the_environment(capsys, monkeypatch):
    import cmw_transfer.dataset as dataset

    monkeypatch.setattr(dataset, "create_dataset", _raise(OSError(errno.EROFS, "Read-only file system", "/mnt/x")))
    code, _, err = call_main(["data", "--dataset", "digits"], capsys)
    assert code == 2 and one_error_line(err) == "error: /mnt/x: Read-only file system"
    monkeypatch.setattr(dataset, "create_dataset", _raise(OSError("no errno, no path: a bug")))
    code, _, err = call_main(["data", "--dataset", "digits"], capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].endswith("please report it")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root); skipped where it cannot be mounted."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the injected-OSError tests cover the mapping)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_in_torch_save_and_plot_on_a_real_tmpfs(capsys, tiny_tmpfs):
    target = tiny_tmpfs / "checkpoint.pt"
    write_text(target, "previous checkpoint\n")
    with pytest.raises(UserError, match=rf"cannot write {target}: No space left on device"):
        with atomic_path(target) as tmp:
            torch.save({"w": torch.zeros(64 * 1024)}, tmp)  # 256 KiB into 64 KiB
    assert target.read_text() == "previous checkpoint\n"
    with pytest.raises(OSError), open(tiny_tmpfs / "filler", "wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()
    code, _, err = call_main(["data", "--dataset", "digits", "--plot", str(tiny_tmpfs / "sizes.png")], capsys)
    assert code == 2 and "No space left on device" in one_error_line(err)
    assert not (tiny_tmpfs / "sizes.png").exists()


# -- --nproc: one error line from N workers and torchrun ---------------------------------------------------------
TORCHRUN_REPORT = (b"E1201 19:05:16.744000 12607 /x/torch/distributed/elastic/multiprocessing/api.py:1] failed\n"
                   b"Traceback (most recent call last):\n  File \"run.py\", line 1, in <module>\n"
                   b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + b"=" * 60 + b"\n"
                   b"Failures:\n[1]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 2)\n"
                   b"Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n"
                   b"  exitcode  : 2 (pid: 1)\n" + b"=" * 60 + b"\n")


def _relay(chunks, returncode):
    import io

    from cmw_transfer.cli.launch import StderrRelay

    out = io.BytesIO()
    relay = StderrRelay(out)
    for chunk in chunks:
        relay.feed(chunk)
    return relay.finish(returncode), out.getvalue()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_relay_prints_the_error_once_last_with_the_root_cause_exit_code(chunk_size):
    stream = (b"apply: digits [train]\n\repoch 1:  40%|####\repoch 1:  80%|########\n"
              b"error: list file x not found\nerror: list file x not found\n" + TORCHRUN_REPORT)
    code, out = _relay([stream[i:i + chunk_size] for i in range(0, len(stream), chunk_size)], 1)
    assert code == 2
    assert out == b"apply: digits [train]\n\repoch 1:  40%|####\repoch 1:  80%|########\nerror: list file x not found\n"


def test_relay_keeps_torchruns_report_when_no_worker_explained_itself():
    code, out = _relay([b"W1201 1 2 torch/distributed/elastic/x] Sending SIGTERM\n", TORCHRUN_REPORT], 1)
    assert code == 1 and out.endswith(TORCHRUN_REPORT) and out.startswith(b"W1201")


def test_relay_passes_a_successful_run_through():
    stream = b"apply: ok\n\r 50%|##\r100%|####\ndone: run\n"
    assert _relay([stream], 0) == (0, stream)

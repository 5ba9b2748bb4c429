"""Numbers and lists as a hostile user types them: ASCII digits only, lists without empty or repeated items, in
order where order matters, bounded by what this machine can do, refused in one line before any work."""

from __future__ import annotations

import json
import random
import shutil
import string
import sys
from collections import namedtuple

import click
import pytest

from cmw_transfer.cli import options as opt
from cmw_transfer.errors import UserError
from tests.helpers import call_main, one_error_line

APPLY = ["apply", "--dataset", "digits", "--weighting", "none", "--model", "small_cnn", "--epochs", "2",
         "--workers", "0", "--no-progress", "--device", "cpu"]
META = ["metatrain", "--src", "digits-pmd", "--device", "cpu", "--workers", "0", "--quiet"]
PROBE = ["probe", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--quiet"]
# every character Python's int() takes for a digit that is not one of 0-9 (Arabic-Indic, Devanagari, fullwidth...)
FOREIGN_DIGITS = [chr(c) for c in range(0x110000) if chr(c).isdecimal() and chr(c) not in string.digits]


def _case_id(value: object) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


def refused(capsys, tmp_path, args: list[str]) -> str:
    code, out, err = call_main([*args, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and out == "", err
    assert not (tmp_path / "run").exists()
    return one_error_line(err)


# -- the parsers --------------------------------------------------------------------------------------------------
def test_no_digit_of_another_script_is_a_number():
    from cmw_transfer.parsing import ascii_float, ascii_int

    assert len(FOREIGN_DIGITS) > 500 and int(FOREIGN_DIGITS[0]) == 0  # what Python's int() would have taken
    for char in FOREIGN_DIGITS:
        for text in (char, f"1{char}", f"0.{char}"):
            with pytest.raises(UserError, match="digits 0-9"):
                ascii_float(text, "--x")
        with pytest.raises(UserError, match="digits 0-9"):
            ascii_int(f"1{char}", "--x")
    for text in ("1_000", "1 000", "\u20073", "0x10", "1e3", "", "+", "3.0"):
        with pytest.raises(UserError):
            ascii_int(text, "--x")


@pytest.mark.parametrize("text", ["nan", "-inf", "1e400", "1e-320", "-4e-39", "1_0.5", "٠.٤", "0x1p-3", ".", "e5"])
def test_ascii_float_refuses_what_float_would_take_or_float32_cannot_hold(text):
    from cmw_transfer.parsing import ascii_float

    with pytest.raises(UserError):
        ascii_float(text, "--x")


def test_int_lists_round_trip_and_refuse_rather_than_repair():
    from cmw_transfer.parsing import parse_int_list, parse_name_list

    rng = random.Random(0)
    for _ in range(300):
        values = sorted(rng.sample(range(10_000), rng.randint(1, 8)))
        text = rng.choice([",", ", ", " ,"]).join(map(str, values))
        assert parse_int_list(text, "--o", example="1,2", ascending=True) == tuple(values)
        if len(values) > 1:  # any other order, any repeat, any empty item: refused, never sorted or dropped
            shuffled = values[::-1]
            with pytest.raises(UserError, match="increasing order"):
                parse_int_list(",".join(map(str, shuffled)), "--o", example="1,2", ascending=True)
            with pytest.raises(UserError, match="twice"):
                parse_int_list(",".join(map(str, [*values, values[0]])), "--o", example="1,2")
            k = rng.randrange(len(values) + 1)
            holed = [*map(str, values[:k]), "", *map(str, values[k:])]
            with pytest.raises(UserError, match=f"item {k + 1} is empty"):
                parse_int_list(",".join(holed), "--o", example="1,2")
    for text in (",", "", " , "):
        with pytest.raises(UserError, match="names nothing"):
            parse_int_list(text, "--o", example="1,2")
    assert parse_name_list("tensorboard, csv", "--log", choices=("csv", "tensorboard")) == ("csv", "tensorboard")
    for text in ("", ",", "csv,", "csv,csv", "cvs"):
        with pytest.raises(UserError):
            parse_name_list(text, "--log", choices=("csv", "tensorboard"))


# -- item 5: bounded before any work ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--epochs", "1000000000000"], "--epochs"), (["--epochs", "1"], "--epochs"), (["--seed", "-1"], "--seed"),
    (["--lr", "nan"], "--lr"), (["--lr", "1e-320"], "--lr"), (["--lr", "٠.١"], "--lr"), (["--momentum", "1"],
    "--momentum"), (["--drop-fraction", "1"], "--drop-fraction"), (["--cycle-low", "0"], "--cycle-low"),
    (["--imbalance", "nan"], "--imbalance"), (["--batch-size", str(2**40)], "--batch-size"),
    (["--device", "meta"], "--device"), (["--workers", "1000000"], "--workers"), (["--threads", "100000"],
    "--threads"), (["--log", ""], "--log"),
], ids=_case_id)
def test_probe_options_are_typed_and_bounded(capsys, tmp_path, no_work, args, needle):
    assert needle in refused(capsys, tmp_path, [*PROBE, *args])


def test_probe_refuses_curves_larger_than_the_free_disk_before_building_anything(capsys, tmp_path, monkeypatch):
    import cmw_transfer.models as models
    import cmw_transfer.trainer.curvenet.probe as probe_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("built a model")

    monkeypatch.setattr(models, "create_model", forbidden)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 0, 100_000))  # 100 kB free
    code, _, err = call_main([*PROBE, "--epochs", "1000", "--out", str(tmp_path / "p")], capsys)
    line = one_error_line(err)
    assert code == 2 and "--epochs 1000" in line and "1347 samples" in line and "2.7 MB" in line, line
    assert not (tmp_path / "p" / probe_mod.LOSSES_NAME).exists()


def test_probe_refuses_a_step_that_cannot_fit_before_reading_the_list(capsys, tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"{c}/{i}.png {c}\n" for c in range(2) for i in range(3)))  # no images
    code, _, err = call_main(["probe", "--dataset", f"list:{tmp_path / 'train.txt'}", "--model", "resnet50",
                              "--batch-size", "65536", "--device", "cpu", "--out", str(tmp_path / "p")], capsys)
    line = one_error_line(err)
    assert code == 2 and "one training step of resnet50 at 3x224x224 with 65536 samples" in line, line


@pytest.mark.parametrize("args, needle", [
    (["--calibrate-img-size", "0"], "--calibrate-img-size"), (["--calibrate-img-size", "-3"], "--calibrate-img-size"),
    (["--calibrate-epochs", "0"], "--calibrate-epochs"), (["--calibrate-epochs", "٣"], "--calibrate-epochs"),
    (["--device", "meta"], "--device"),
], ids=_case_id)
def test_import_calibration_options_are_bounded(capsys, tmp_path, args, needle):
    code, _, err = call_main(["import", "--from", "official-cmwnet", str(tmp_path / "vnet.pth"), "--out",
                              str(tmp_path / "o"), "--calibrate-on", "digits", *args], capsys)
    assert code == 2 and needle in one_error_line(err)


def test_import_calibration_refuses_a_size_the_model_cannot_take(capsys, tmp_path):
    from tests.test_import_official import official_state, write_official

    path = write_official(tmp_path / "vnet.pth", official_state())
    code, _, err = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(tmp_path / "o"),
                              "--calibrate-on", "digits", "--calibrate-model", "vit_tiny_patch16_224",
                              "--calibrate-img-size", "8"], capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot take 3x8x8 inputs" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind, option, command", [("workers", "--workers", APPLY), ("threads", "--threads", APPLY),
                                                    ("workers", "--workers", META), ("threads", "--threads", PROBE)])
def test_worker_and_thread_counts_are_bounded_by_this_machine(capsys, tmp_path, no_work, kind, option, command):
    limit, why = opt.machine_limit(kind)
    line = refused(capsys, tmp_path, [*command, option, str(limit + 1)])
    assert option in line and f"at most {limit}" in line and why in line
    assert opt.MachineBound(kind, 0, 10**6).convert(str(limit), None, None) == limit  # the limit itself is fine


def test_nproc_is_bounded_by_this_machine_before_torchrun_starts(capsys, tmp_path, no_work, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    limit, _ = opt.machine_limit("processes")
    line = refused(capsys, tmp_path, [*APPLY, "--nproc", str(limit + 1)])
    assert f"--nproc {limit + 1}" in line and f"at most {limit}" in line


@pytest.mark.parametrize("setting, needle", [
    ({"lr": 1e-320}, "lr"), ({"epochs": 10**12}, "epochs"), ({"epochs": "٣"}, "epochs"), ({"epochs": 2.5}, "epochs"),
    ({"seed": -1}, "seed"), ({"workers": 10**6}, "workers"), ({"img_size": 0}, "img_size"),
    ({"open_classes": [2, 1]}, "increasing"), ({"decay_milestones": [3, 3], "sched": "multistep"}, "twice"),
    ({"log": ""}, "log"), ({"momentum": True}, "momentum"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_a_config_file_is_bounded_as_the_command_line_is(capsys, tmp_path, no_work, setting, needle):
    (tmp_path / "c.json").write_text(json.dumps({"dataset": "digits", "out": "ignored", "weighting": "none",
                                                 **setting}))
    line = refused(capsys, tmp_path, ["apply", "--dataset", "digits", "--config", str(tmp_path / "c.json")])
    assert needle in line and "c.json" in line, line


def test_metatrain_config_file_is_bounded_too(capsys, tmp_path, no_work):
    (tmp_path / "c.json").write_text(json.dumps({"meta_lr": 1e-30, "epochs": 3}))
    line = refused(capsys, tmp_path, [*META, "--config", str(tmp_path / "c.json")])
    assert "c.json" in line and "meta_lr" in line


def test_every_numeric_option_of_every_command_takes_ascii_digits_only(capsys, tmp_path, monkeypatch):
    """Walk every command's options: each numeric one is a validated type, and refuses a foreign digit."""
    import importlib

    from cmw_transfer.cli import SUBCOMMANDS

    monkeypatch.setattr(sys, "argv", ["cmw-transfer"])
    checked = 0
    for module, attr, _ in SUBCOMMANDS.values():
        command = getattr(importlib.import_module(module), attr)
        for param in command.params:
            kind = param.type
            if isinstance(kind, click.types.FloatParamType):
                assert isinstance(kind, opt.FiniteFloat), (command.name, param.name)
            elif isinstance(kind, click.types.IntParamType):
                assert isinstance(kind, opt.AsciiIntRange) and kind.max is not None, (command.name, param.name)
            else:
                continue
            with pytest.raises(click.BadParameter, match="digits 0-9"):
                kind.convert("٣", param, None)
            checked += 1
    assert checked >= 60


# -- item 7: malformed values are refused, not repaired -------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--open-classes", ","], "names nothing"), (["--open-classes", "1,,2"], "item 2 is empty"),
    (["--open-classes", "2,1"], "increasing order"), (["--open-classes", "1,1"], "twice"),
    (["--open-classes", "٩"], "digits 0-9"), (["--open-classes", "-1"], "0..999999"),
    (["--sched", "multistep", "--decay-milestones", "5,2"], "increasing order"),
    (["--sched", "multistep", "--decay-milestones", "2,,5"], "item 2 is empty"),
    (["--sched", "multistep", "--decay-milestones", "0"], "1..100000"),
    (["--sched", "multistep", "--decay-milestones", "1,9"], "at most 2"),
    (["--decay-milestones", "1"], "only apply to --sched multistep"),
    (["--noise", "sym:٠.٤"], "digits 0-9"), (["--noise", "sym:1e-320"], "too small"),
    (["--extra-eval", "ilsvrc12"], "NAME=SPEC"), (["--extra-eval", "a=digits", "--extra-eval", "a=digits"], "twice"),
    (["--log", ""], "names nothing"), (["--log", "csv,"], "item 2 is empty"), (["--log", "csv,csv"], "twice"),
    (["--device", "cuda:٠"], "not a device"), (["--lr", "1e-320"], "too small"), (["--lr", "1e-13"], "1e-12"),
], ids=_case_id)
def test_apply_refuses_malformed_values(capsys, tmp_path, no_work, monkeypatch, args, needle):
    import cmw_transfer.trainer.engine.launch as launch_mod

    def stop(cfg):  # --noise is parsed with the data: stop right there, before any is loaded
        from cmw_transfer.dataset import resolve_source

        resolve_source(cfg.dataset, cfg.noise, cfg.imbalance)
        raise AssertionError("accepted")

    monkeypatch.setattr(launch_mod, "run_stage", lambda cfg: (cfg.validate(), stop(cfg)))
    assert needle in refused(capsys, tmp_path, [*APPLY, *args])


@pytest.mark.parametrize("args, needle", [
    (["--noise", "sym:٠.٤"], "digits 0-9"), (["--noise", "pmd1:0.3+asym:٠.٢"], "digits 0-9"),
    (["--meta-set", "clean:²"], "clean:N"), (["--meta-set", "clean:٣"], "clean:N"),
    (["--meta-grad", "skip:٣"], "skip:N"), (["--meta-lr", "1e-320"], "--meta-lr"), (["--log", ","], "--log"),
    (["--hidden-size", "٨"], "--hidden-size"),
], ids=_case_id)
def test_metatrain_refuses_malformed_values(capsys, tmp_path, no_work, monkeypatch, args, needle):
    import cmw_transfer.cli.metatrain_cmd as cmd
    from cmw_transfer.dataset import resolve_source

    def stop(cfg):
        cfg.validate()
        resolve_source(cfg.src, cfg.noise, cfg.imbalance)
        raise AssertionError("accepted")

    monkeypatch.setattr("cmw_transfer.trainer.engine.launch.run_stage", stop)
    assert cmd is not None and needle in refused(capsys, tmp_path, [*META, *args])


@pytest.mark.parametrize("args, needle", [
    (["--noise", "sym:٠.٤"], "digits 0-9"), (["--families", "٣"], "--families"), (["--seed", "٧"], "--seed"),
    (["--imbalance", "١٠"], "--imbalance"),
], ids=_case_id)
def test_data_refuses_foreign_digits(capsys, args, needle):
    code, _, err = call_main(["data", "--dataset", "digits", *args], capsys)
    assert code == 2 and needle in one_error_line(err)


@pytest.mark.parametrize("args, needle", [
    (["--repo", "org/name\n"], "--repo must look like org/name"), (["--repo", "org/na me"], "--repo"),
    (["--repo", "org/name", "--revision", "main\n"], "--revision"),
    (["--repo", "org/name", "--revision", "../other"], "--revision"),
], ids=_case_id)
def test_push_refuses_a_repo_or_revision_that_is_not_one(capsys, tmp_path, args, needle):
    code, _, err = call_main(["push", "--weights", str(tmp_path), *args], capsys)
    assert code == 2 and needle in one_error_line(err)

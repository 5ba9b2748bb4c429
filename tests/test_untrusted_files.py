"""One hardened reader for untrusted safetensors headers and metadata; one line for every hostile file (issue 22,
items 3, 4, 8)."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from cmw_transfer import untrusted
from cmw_transfer.artifact import CMWNet
from cmw_transfer.errors import UserError
from cmw_transfer.untrusted import loads, read_safetensors
from tests.helpers import call_main, make_net, run_cli

TINY_APPLY = ["apply", "--dataset", "digits", "--weighting", "none", "--model", "small_cnn", "--epochs", "1",
              "--workers", "0", "--no-progress", "--device", "cpu"]


# -- bounded JSON ---------------------------------------------------------------------------------------------------
def _random_json(rng: random.Random, depth: int):
    if depth == 0:
        return rng.choice([1, -2.5, "a[{\\\"", "]}", None, True, "x" * rng.randint(0, 5)])
    if rng.random() < 0.5:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(1, 3))]
    return {f"k{i}[": _random_json(rng, depth - 1) for i in range(rng.randint(1, 3))}


def test_bounded_loads_equals_json_loads_within_the_limit():
    rng = random.Random(0)
    for _ in range(300):
        value = _random_json(rng, rng.randint(0, 7))
        text = json.dumps(value)
        assert loads(text) == json.loads(text) and loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("wrap", [lambda d: "[" * d + "]" * d, lambda d: '{"a":' * d + "1" + "}" * d])
def test_nesting_is_refused_exactly_past_the_limit(wrap):
    limit = untrusted.MAX_JSON_DEPTH
    assert loads(wrap(limit)) is not None
    with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {limit} levels"):
        loads(wrap(limit + 1))
    with pytest.raises(json.JSONDecodeError, match="nested deeper"):
        loads(wrap(30_000))  # json.loads itself: RecursionError
    # brackets inside strings, and escaped quotes inside them, do not nest
    assert loads(json.dumps(["[" * 100 + '\\"{' * 100])) == ["[" * 100 + '\\"{' * 100]


def test_every_failure_of_loads_is_a_decode_error():
    for text in ("1" * 5000, b"\xff\xfe", "[1,", "", "nul"):
        with pytest.raises(json.JSONDecodeError):
            loads(text)


# -- safetensors headers ----------------------------------------------------------------------------------------------
def _net_file(tmp_path):
    path = tmp_path / "net.safetensors"
    make_net().save_safetensors(path)
    return path


def _set_length(path, length: int) -> None:
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + blob[8:])


DEEP = "__deep__"  # replaced by a nest too deep for json.dumps to write


def _nest(text: str, depth: int) -> str:
    return text.replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth)


def _rewrite_header(path, edit, depth: int = 0) -> None:
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    edit(header)
    text = _nest(json.dumps(header), depth).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size:])


def _edit_config(edit, depth: int = 0):
    def apply(header):
        config = json.loads(header["__metadata__"]["cmw_transfer.config"])
        edit(config)
        header["__metadata__"]["cmw_transfer.config"] = _nest(json.dumps(config), depth)
    return apply


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: _set_length(p, 2**62),
     "not a readable safetensors file \\(its header claims 4611686018427387904 bytes, over the 104857600-byte limit"),
    (lambda p: _set_length(p, 2**20), "only .* follow: the file is truncated"),
    (lambda p: p.write_bytes(b"\x01\x02"), "2 bytes is too short"),
    (lambda p: _rewrite_header(p, lambda h: h.update(__metadata__={"a": 5})), "metadata must map strings to strings"),
    (lambda p: _rewrite_header(p, lambda h: h.update(x=DEEP), 30_000),
     "header is not valid JSON \\(nested deeper than 64"),
    (lambda p: _rewrite_header(p, _edit_config(lambda c: c.update(provenance={"x": DEEP}), 30_000)),
     "config in the header is not valid JSON \\(nested deeper than 64 levels\\)"),
])
def test_a_hostile_header_is_one_user_error(tmp_path, damage, message):
    path = _net_file(tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message) as exc:
        CMWNet.from_pretrained(str(path))
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_a_metadata_value_past_the_limit_is_refused(tmp_path, monkeypatch):
    path = _net_file(tmp_path)
    _rewrite_header(path, lambda h: h["__metadata__"].update(note="y" * 5000))
    monkeypatch.setattr(untrusted, "MAX_METADATA_CHARS", 4096)
    with pytest.raises(UserError, match="metadata 'note' is 5000 characters long, over the 4096-character limit"):
        read_safetensors(path)


def test_a_deep_side_config_json_is_one_user_error(tmp_path):
    make_net().save_pretrained(tmp_path / "net")
    (tmp_path / "net" / "config.json").write_text("[" * 30_000 + "]" * 30_000)
    with pytest.raises(UserError, match=r"config\.json is not valid JSON \(nested deeper than 64 levels\)"):
        CMWNet.from_pretrained(str(tmp_path / "net"))


@pytest.mark.parametrize("damage", [lambda p: _set_length(p, 2**62),
                                    lambda p: _rewrite_header(p, _edit_config(lambda c: c.update(
                                        provenance={"x": DEEP}), 50_000))], ids=["2^62-header", "deep-provenance"])
@pytest.mark.parametrize("command", ["inspect", "apply --weights", "apply --initial-checkpoint"])
def test_cli_hostile_header_is_one_line(tmp_path, capsys, damage, command):
    make_net().save_pretrained(tmp_path / "net")
    path = tmp_path / "net" / "model.safetensors"
    damage(path)
    (tmp_path / "net" / "config.json").unlink()
    if command == "inspect":
        args = ["inspect", "--weights", str(tmp_path / "net")]
    elif command == "apply --weights":
        args = [*TINY_APPLY, "--weighting", "cmw", "--weights", str(tmp_path / "net"), "--out", str(tmp_path / "r")]
    else:
        args = [*TINY_APPLY, "--initial-checkpoint", str(path), "--out", str(tmp_path / "r")]
    code, _, err = call_main(args, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err


def test_initial_checkpoint_safetensors_goes_through_the_bounded_reader(tmp_path):
    """A classifier exported as safetensors initialises the model exactly, as timm's loader did."""
    from safetensors.torch import save_model

    from cmw_transfer.models import create_model

    torch.manual_seed(1)
    trained = create_model("small_cnn", 10, in_chans=1)
    save_model(trained, str(tmp_path / "classifier.safetensors"))
    loaded = create_model("small_cnn", 10, in_chans=1, checkpoint_path=tmp_path / "classifier.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="does not load into 'small_cnn'"):
        create_model("small_cnn", 7, in_chans=1, checkpoint_path=tmp_path / "classifier.safetensors")


def test_inspect_shortens_a_huge_provenance_value(tmp_path, capsys):
    net = make_net()
    net.provenance = {"source": "digits", "note": "z" * 1_000_000}
    net.save_pretrained(tmp_path / "net")
    code, out, err = call_main(["inspect", "--weights", str(tmp_path / "net")], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("note:"))
    assert line.endswith("... (1000000 characters)") and len(line) < 300
    assert max(len(line) for line in out.splitlines()) < 300
    code, out, _ = call_main(["inspect", "--weights", str(tmp_path / "net"), "--json"], capsys)
    assert json.loads(out)["config"]["provenance"]["note"] == "z" * 1_000_000  # --json: exactly as stored


# -- torch's pickle-protocol warning before the error line (item 8) ----------------------------------------------------
class _Payload:
    def __reduce__(self):
        return print, ("unpickled!",)


@pytest.fixture
def evil_pickle(tmp_path):
    """A legacy (non-zip) protocol-4 pickle: torch warns "Detected pickle protocol 4" before refusing it."""
    import pickle

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"a": _Payload()}, protocol=4))
    return path


@pytest.mark.parametrize("args", [["import", "--from", "official-cmwnet", "{pkl}", "--out", "{tmp}/imported"],
                                  [*TINY_APPLY, "--initial-checkpoint", "{pkl}", "--out", "{tmp}/run"],
                                  [*TINY_APPLY, "--out", "{tmp}/planted", "--resume"]],
                         ids=["import", "apply--initial-checkpoint", "apply--resume"])
def test_a_refused_pickle_is_exactly_one_stderr_line(tmp_path, evil_pickle, args):
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "checkpoint.pt").write_bytes(evil_pickle.read_bytes())  # a run dir from elsewhere
    proc = run_cli(*(a.format(pkl=evil_pickle, tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "unpickled!" not in proc.stdout + proc.stderr

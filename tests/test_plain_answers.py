"""Answers that say what is wrong, in one line and in seconds: which option a refused resume changed, an
unreachable Hub, one families note that matches the families, a missing list file said as such."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import warnings

import huggingface_hub
import numpy as np
import pytest
import torch

from cmw_transfer.artifact.scales import DegenerateScalesWarning, fit_families
from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config import ApplyConfig
from tests.helpers import call_main, one_error_line

TINY = ["--dataset", "digits", "--imbalance", "10", "--weighting", "none", "--model", "small_cnn", "--workers", "0",
        "--batch-size", "64", "--device", "cpu", "--no-progress", "--lr", "0.05"]


# -- a refused resume names what changed ----------------------------------------------------------------------------
def test_apply_resume_names_the_changed_options_old_to_new(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = call_main(["apply", *TINY, "--epochs", "2", "--out", out], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    code, _, err = call_main(["apply", *TINY, "--epochs", "2", "--out", out, "--resume", "--lr", "0.5", "--seed", "3",
                              "--eval-every", "2"], capsys)  # --eval-every may change on a resume: not named
    line = one_error_line(err)
    assert code == 2 and "--lr 0.05 -> 0.5" in line and "--seed 0 -> 3" in line, line
    assert "eval-every" not in line and "!=" not in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_probe_resume_names_the_changed_options(tmp_path, capsys):
    out = str(tmp_path / "probe")
    base = ["probe", "--dataset", "digits", "--imbalance", "10", "--epochs", "2", "--device", "cpu", "--quiet",
            "--out", out]
    assert call_main(base, capsys)[0] == 0
    code, _, err = call_main([*base, "--resume", "--noise", "sym:0.2", "--epochs", "3"], capsys)
    line = one_error_line(err)
    assert code == 2 and "--noise (unset) -> sym:0.2" in line and "--epochs 2 -> 3" in line, line


def test_mismatch_falls_back_to_the_fingerprints_without_a_saved_configuration(tmp_path):
    from cmw_transfer.config_diff import changed_options, mismatch_message

    old = ApplyConfig(dataset="digits", out=str(tmp_path), lr=0.1, open_classes=(9,), trainer="oltr")
    new = ApplyConfig(dataset="digits", out=str(tmp_path), lr=0.2, open_classes=(8, 9), trainer="oltr", workers=7)
    assert changed_options(old.to_dict(), new) == ["--lr 0.1 -> 0.2", "--open-classes 9 -> 8,9"]  # not --workers
    assert changed_options({"not": "a config"}, new) == []
    path = tmp_path / "checkpoint.pt"
    message = mismatch_message(path, old.fingerprint(), new, new.fingerprint())  # no config.json there
    assert f"({old.fingerprint()} != {new.fingerprint()})" in message
    (tmp_path / "config.json").write_text(json.dumps({**old.to_dict(), "fingerprint": old.fingerprint()}))
    assert "(changed: --lr 0.1 -> 0.2; --open-classes 9 -> 8,9)" in mismatch_message(path, old.fingerprint(), new,
                                                                                      new.fingerprint())
    (tmp_path / "config.json").write_text(json.dumps({**old.to_dict(), "fingerprint": "another run"}))
    assert "!=" in mismatch_message(path, old.fingerprint(), new, new.fingerprint())  # not this run's file


# -- an unreachable Hub answers in seconds ---------------------------------------------------------------------------
@pytest.fixture
def silent_server():
    """A local socket that accepts connections and never answers: the realistic hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("where", ["closed-port", "silent-server"])
def test_an_unreachable_hub_answers_within_five_seconds(where, silent_server, tmp_path, monkeypatch):
    import cmw_transfer.weights.hub as weights_hub
    from cmw_transfer.artifact import CMWNet

    endpoint = "http://127.0.0.1:1" if where == "closed-port" else silent_server
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    weights_hub._probe.cache_clear()
    start = time.perf_counter()
    with pytest.raises(UserError, match="not in the local Hugging Face cache and the Hub cannot be reached") as info:
        CMWNet.from_pretrained("hub:org/missing")
    seconds = time.perf_counter() - start
    weights_hub._probe.cache_clear()
    assert seconds < 5.0, f"{seconds:.1f} s"
    assert endpoint in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_hub_still_serves_the_cache(tmp_path, monkeypatch):
    import cmw_transfer.weights.hub as weights_hub
    from cmw_transfer.artifact import CMWNet
    from tests.helpers import make_net
    from tests.test_hub_mixin import cached_repo

    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    weights_hub._probe.cache_clear()
    net = make_net(seed=4)
    cached_repo(tmp_path / "cache", "org/name", net)
    loaded = CMWNet.from_pretrained("hub:org/name")
    weights_hub._probe.cache_clear()
    assert torch.equal(loaded.trunk.weight, net.trunk.weight)


# -- one families note, and the one that describes the families ---------------------------------------------------
def _note_heads(note: str) -> list[int]:
    match = re.search(r"heads \[([0-9, ]*)\]", note)
    assert match, note
    return [int(h) for h in match.group(1).split(",")]


def test_fit_families_says_one_rule_and_the_heads_it_says_are_the_heads_used():
    rng = np.random.default_rng(0)
    shapes = [[10, 10, 11], [100, 100, 120, 130], [5, 5, 5], [10, 10, 40], [1, 1, 2, 2, 50]]
    shapes += [rng.choice(rng.integers(5, 400, size=rng.integers(1, 4)), size=rng.integers(2, 9)).tolist()
               for _ in range(40)]
    noted = 0
    for counts in shapes:
        for k in (2, 3, 4):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                centers, family = fit_families(counts, k)
            notes = [str(w.message) for w in caught if issubclass(w.category, DegenerateScalesWarning)]
            assert len(notes) <= 1, (counts, k, notes)
            if notes:
                noted += 1
                assert _note_heads(notes[0]) == sorted(set(family.tolist())), (counts, k, notes[0], family)
            assert np.all(np.diff(centers) > 0)
    assert noted > 20


def test_data_on_an_odd_list_prints_one_note_that_matches_the_table(tmp_path, capsys):
    rows = [f"a{i}.png 0" for i in range(10)] + [f"b{i}.png 1" for i in range(10)] + [f"c{i}.png 2" for i in range(11)]
    (tmp_path / "odd.txt").write_text("\n".join(rows) + "\n")
    code, out, err = call_main(["data", "--dataset", f"list:{tmp_path / 'odd.txt'}", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and err == ""
    used = sorted({f for f in info["family_of_class"] if f is not None})
    assert _note_heads(info["families_note"]) == used == [1]


# -- a missing list file is "not found" ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["metatrain", "--src", "list:{}", "--device", "cpu", "--out", "{out}"],
    ["probe", "--dataset", "list:{}", "--meta-set", "clean:2", "--device", "cpu", "--out", "{out}"],
    ["apply", "--dataset", "list:{}", "--weighting", "none", "--device", "cpu", "--out", "{out}"],
    ["data", "--dataset", "list:{}"],
], ids=lambda c: c[0])
def test_a_missing_list_file_is_not_found(command, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    args = [a.format(missing, out=tmp_path / "run") if "{" in a else a for a in command]
    code, _, err = call_main(args, capsys)
    line = one_error_line(err)
    assert code == 2 and "nope.txt not found" in line and "test split" not in line, line

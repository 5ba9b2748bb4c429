"""Weights specs, the Hub path through huggingface_hub's real cache code, and shipped nets."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from cmw_transfer.weights import spec as spec_mod
from cmw_transfer.weights.spec import WeightsSpec, parse_weights_spec
from tests.helpers import make_net


@pytest.mark.parametrize(("text", "expected"), [
    ("runs/a", WeightsSpec("local", "runs/a")),
    ("w.safetensors", WeightsSpec("local", "w.safetensors")),
    ("hub:org/name", WeightsSpec("hub", "org/name")),
    ("hub:org/name@v1.0", WeightsSpec("hub", "org/name", "v1.0")),
    ("hub:org/name@" + "a" * 40, WeightsSpec("hub", "org/name", "a" * 40)),
    ("pretrained:cmwnet-x", WeightsSpec("pretrained", "cmwnet-x")),
])
def test_parse(text, expected):
    assert parse_weights_spec(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("bad", ["hub:", "hub:noslash", "hub:org/name@", "hub:/name", "hub:org/na me",
                                 "hub:a/b/c", "pretrained:", "pretrained:../x", ""])
def test_malformed_specs(bad):
    with pytest.raises(UserError):
        parse_weights_spec(bad)


def write_hub_cache(cache, repo_id, commit, net):
    """The layout huggingface_hub itself writes: refs/<branch> -> commit, snapshots/<commit>/<files>."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    net.save_pretrained(snap)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    return repo_dir


def test_hub_loads_from_cache_and_pins_revision(offline_cache):
    old, new = make_net(seed=1), make_net(seed=2)
    c_old, c_new = "1" * 40, "2" * 40
    repo_dir = write_hub_cache(offline_cache, "org/cmwnet", c_old, old)
    write_hub_cache(offline_cache, "org/cmwnet", c_new, new)
    (repo_dir / "refs" / "main").write_text(c_new)
    latest = CMWNet.from_pretrained("hub:org/cmwnet", cache_dir=str(offline_cache))
    pinned = CMWNet.from_pretrained(f"hub:org/cmwnet@{c_old}", cache_dir=str(offline_cache))
    assert torch.equal(latest.trunk.weight, new.trunk.weight)
    assert torch.equal(pinned.trunk.weight, old.trunk.weight)
    assert not torch.equal(pinned.trunk.weight, latest.trunk.weight)
    # without an explicit cache_dir the library's configured cache (HF_HUB_CACHE) is used
    assert torch.equal(CMWNet.from_pretrained("hub:org/cmwnet").trunk.weight, new.trunk.weight)


def test_hub_not_cached_and_offline(offline_cache):
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        CMWNet.from_pretrained("hub:org/missing")


def test_hub_cached_file_is_validated(offline_cache):
    repo_dir = write_hub_cache(offline_cache, "org/broken", "3" * 40, make_net())
    (repo_dir / "refs" / "main").write_text("3" * 40)
    (repo_dir / "snapshots" / ("3" * 40) / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="not a readable safetensors"):
        CMWNet.from_pretrained("hub:org/broken")


def test_pretrained_lookup(tmp_path, monkeypatch):
    root = tmp_path / "pretrained"
    make_net(num_heads=1, centers=[100.0]).save_pretrained(root / "mwnet-test")
    monkeypatch.setattr(spec_mod, "_pretrained_roots", lambda: [root])
    assert spec_mod.list_pretrained() == ["mwnet-test"]
    assert CMWNet.from_pretrained("pretrained:mwnet-test").num_heads == 1
    with pytest.raises(UserError, match="unknown pretrained net 'nope'; known: mwnet-test"):
        CMWNet.from_pretrained("pretrained:nope")


def test_shipped_pretrained_nets_load():
    """Every folder under pretrained/ must be a valid artifact (it is what users get first)."""
    for name in spec_mod.list_pretrained():
        net = CMWNet.from_pretrained(f"pretrained:{name}")
        assert net.centers and net.provenance.get("source")


def test_installed_wheel_ships_pretrained(tmp_path):
    """Build the real wheel (with one extra net) and load ``pretrained:NAME`` from the unpacked install."""
    repo = spec_mod.Path(spec_mod.__file__).resolve().parents[2]
    src = tmp_path / "src"
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__", "tests",
                                                            "runs", ".venv", "scripts"))
    make_net().save_pretrained(src / "pretrained" / "cmwnet-wheel")
    (src / "pretrained" / "cmwnet-wheel" / "metrics.jsonl").write_text("{}\n")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("cmw_transfer-*.whl"))
    shipped = zipfile.ZipFile(wheel).namelist()
    assert "cmw_transfer_pretrained/cmwnet-wheel/model.safetensors" in shipped
    assert not [n for n in shipped if n.endswith(("metrics.jsonl", "run.json"))]  # the card carries the metrics
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("from cmw_transfer.weights.spec import list_pretrained; from cmw_transfer import CMWNet; "
             "print(list_pretrained()); print(CMWNet.from_pretrained('pretrained:cmwnet-wheel').centers)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cmwnet-wheel" in out.stdout and str(tmp_path / "site") in subprocess.run(
        [sys.executable, "-c", "import cmw_transfer; print(cmw_transfer.__file__)"], capture_output=True, text=True,
        env=env, cwd=tmp_path).stdout

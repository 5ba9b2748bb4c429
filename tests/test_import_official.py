"""Importing the authors' released weighting nets: the format, the function, the head map, hostile files.

The authors' weights are not shipped (no licence): every fixture here is written by the test in exactly the released
format (same keys, shapes, float32, storages tagged ``cuda:0`` as in ``vnet_119.pth``) from random tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmw_transfer.artifact import official
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from tests.helpers import call_main, run_cli

LOSS_GRID = np.concatenate([np.linspace(0.0, 12.0, 241), [1e-4, 25.0, 60.0]]).astype(np.float32)
PMD_CENTERS = [3208.333333, 4110.0, 5431.0]


# -- the authors' modules, re-declared with their attribute names (resnet.py share / task / VNet) -------------------
class Share(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True))


class Task(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) for _ in range(heads)])


class OfficialVNet(nn.Module):
    """``VNet(1, 100, 100, 1, 3)``: ``feature`` trunk and ``classfier`` heads (the authors' spelling)."""

    def __init__(self, hidden: int = 100, heads: int = 3) -> None:
        super().__init__()
        self.feature = Share(hidden)
        self.classfier = Task(hidden, heads)


class OfficialMWNet(nn.Module):
    """MW-Net's ``VNet(1, 100, 1)``."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, hidden)
        self.linear2 = nn.Linear(hidden, 1)


def official_state(seed: int = 0, kind: str = "official-cmwnet") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    module = OfficialVNet() if kind == "official-cmwnet" else OfficialMWNet()
    with torch.no_grad():  # spread the heads' biases so that the curves differ clearly
        for p in module.parameters():
            p.mul_(3.0)
    return module.state_dict()


def tag_storages(blob: bytes, location: str = "cuda:0") -> bytes:
    """Re-tag every storage of a ``torch.save`` zip as saved on ``location`` (the pickled location string)."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    old = b"X\x03\x00\x00\x00cpu"  # BINUNICODE 'cpu' in the protocol-2 data.pkl (no frames: lengths are local)
    new = b"X" + len(location).to_bytes(4, "little") + location.encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info.filename, data)
    return out.getvalue()


def write_official(path: Path, state: dict[str, torch.Tensor], cuda_tag: bool = True) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(tag_storages(buf.getvalue()) if cuda_tag else buf.getvalue())
    return path


def storage_locations(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    strings = [arg for op, arg, _ in pickletools.genops(pkl) if op.name == "BINUNICODE"]
    return {s for s in strings if s == "cpu" or s.startswith("cuda")}


def official_weights(state: dict[str, torch.Tensor], head: int, losses: np.ndarray,
                     kind: str = "official-cmwnet") -> np.ndarray:
    """The authors' forward for one head, from the raw tensors: Linear(1->H)+ReLU -> Linear(H->1)+Sigmoid."""
    x = torch.as_tensor(losses).reshape(-1, 1).double()
    if kind == "official-mwnet":
        w1, b1, w2, b2 = (state[k].double() for k in ("linear1.weight", "linear1.bias", "linear2.weight",
                                                       "linear2.bias"))
    else:
        w1, b1 = state["feature.layer.0.weight"].double(), state["feature.layer.0.bias"].double()
        w2 = state[f"classfier.layers.{head}.0.weight"].double()
        b2 = state[f"classfier.layers.{head}.0.bias"].double()
    hidden = torch.relu(x @ w1.T + b1)
    return torch.sigmoid(hidden @ w2.T + b2).reshape(-1).numpy()


@pytest.fixture
def vnet_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = official_state()
    return write_official(tmp_path / "vnet_119.pth", state), state


# -- the fixture really is in the released format ----------------------------------------------------------------
def test_fixture_has_the_released_layout(vnet_file):
    path, state = vnet_file
    assert storage_locations(path) == {"cuda:0"}
    assert sorted(state) == sorted(["feature.layer.0.weight", "feature.layer.0.bias"]
                                   + [f"classfier.layers.{j}.0.{p}" for j in range(3) for p in ("weight", "bias")])
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {
        "feature.layer.0.weight": (100, 1), "feature.layer.0.bias": (100,),
        **{f"classfier.layers.{j}.0.weight": (1, 100) for j in range(3)},
        **{f"classfier.layers.{j}.0.bias": (1,) for j in range(3)}}
    assert all(v.dtype == torch.float32 for v in loaded.values())
    if not torch.cuda.is_available():  # the tag is live: without map_location torch wants a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)


# -- the function is the authors' ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [None, (2, 0, 1), (0, 1, 2)])
def test_each_head_reproduces_the_official_function(vnet_file, order):
    path, state = vnet_file
    net = official.from_official(path, head_order=None if order is None else ",".join(map(str, order)))
    expected_order = order or (1, 2, 0)
    curves = net.curves(LOSS_GRID)
    for toolkit_head, official_head in enumerate(expected_order):
        np.testing.assert_allclose(curves[toolkit_head], official_weights(state, official_head, LOSS_GRID),
                                   rtol=0, atol=1e-6)
    assert net.provenance["head_order"] == ",".join(map(str, expected_order))


def test_cli_default_order_and_artifact_round_trip(vnet_file, tmp_path, capsys):
    path, state = vnet_file
    out = tmp_path / "art"
    code, stdout, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out),
                                      "--json"], capsys)
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["head_order"] == [1, 2, 0]
    net = CMWNet.from_pretrained(str(out))  # a normal artifact, through the normal loader
    curves = net.curves(LOSS_GRID)
    for toolkit_head, official_head in enumerate((1, 2, 0)):
        np.testing.assert_allclose(curves[toolkit_head], official_weights(state, official_head, LOSS_GRID),
                                   rtol=0, atol=1e-6)
    back = official.to_official_state_dict(net)  # and back to the authors' layout, exactly
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_custom_head_order_through_the_cli(vnet_file, tmp_path, capsys):
    path, state = vnet_file
    out = tmp_path / "art"
    code, _, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out),
                                 "--head-order", "0,2,1"], capsys)
    assert code == 0, stderr
    net = CMWNet.from_pretrained(str(out))
    for toolkit_head, official_head in enumerate((0, 2, 1)):
        np.testing.assert_allclose(net.curves(LOSS_GRID)[toolkit_head],
                                   official_weights(state, official_head, LOSS_GRID), rtol=0, atol=1e-6)
    assert net.provenance["head_order_reason"] == "given with --head-order"


def test_mwnet_form_is_a_k1_artifact(tmp_path, capsys):
    state = official_state(3, "official-mwnet")
    path = write_official(tmp_path / "vnet.pth", state)
    out = tmp_path / "mw"
    code, _, stderr = call_main(["import", "--from", "official-mwnet", str(path), "--out", str(out)], capsys)
    assert code == 0, stderr
    net = CMWNet.from_pretrained(str(out))
    assert net.num_heads == 1 and net.provenance["method"] == "mwnet"
    grid = torch.as_tensor(LOSS_GRID)
    np.testing.assert_allclose(net(grid).detach().numpy(), official_weights(state, 0, LOSS_GRID, "official-mwnet"),
                               rtol=0, atol=1e-6)
    back = official.to_official_state_dict(net, "official-mwnet")
    assert all(torch.equal(back[k], state[k]) for k in state) and set(back) == set(state)


def test_classmethod_api_matches_function(vnet_file):
    path, _ = vnet_file
    a = CMWNet.from_official(path, kind="official-cmwnet", head_order=[2, 1, 0])
    b = official.from_official(path, "official-cmwnet", head_order="2,1,0")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config() == b.config()


# -- provenance and card --------------------------------------------------------------------------------------------
def test_provenance_and_card_say_what_it_is(vnet_file, tmp_path, capsys):
    path, _ = vnet_file
    out = tmp_path / "art"
    code, _, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out)], capsys)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    prov = config["provenance"]
    assert prov["origin_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["origin_repo"] == "https://github.com/xjtushujun/CMW-Net"
    assert "section6/webvision/vnet_119.pth" in prov["origin_path"]
    assert prov["method"] == "cmwnet-sl"
    assert prov["head_map"].startswith("toolkit head 0 (small) = official head 1")
    assert "inferred from the released curves" in prov["head_order_reason"]
    assert prov["source_counts"] == list(official.CIFAR10_PMD_COUNTS)
    assert prov["loss_range"].startswith("unknown")
    assert config["loss_range"] is None
    np.testing.assert_allclose(config["centers"], PMD_CENTERS, atol=1e-3)  # the toolkit's k-means on those counts
    card = (out / "README.md").read_text()
    assert "the authors' released weighting net" in card and prov["origin_sha256"] in card
    assert "license: unknown" in card and "license: mit" not in card
    assert "--soft-labels" in card
    assert (out / "curves.png").is_file()


def test_source_counts_option_sets_centers(vnet_file):
    path, _ = vnet_file
    net = official.from_official(path, source_counts="10,11,50,52,200,210")
    np.testing.assert_allclose(net.centers, [10.5, 51.0, 205.0])
    assert net.provenance["source_counts_origin"] == "given with --source-counts"


def test_calibration_on_digits_records_a_loss_range(vnet_file, tmp_path, capsys):
    path, _ = vnet_file
    out = tmp_path / "cal"
    code, stdout, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out),
                                      "--calibrate-on", "digits", "--calibrate-epochs", "3", "--json"], capsys)
    assert code == 0, stderr
    net = CMWNet.from_pretrained(str(out))
    rng = net.loss_range
    assert set(rng) == {"min", "p1", "p50", "p99", "max"}
    values = [rng[k] for k in ("min", "p1", "p50", "p99", "max")]
    assert values == sorted(values) and values[0] >= 0.0
    assert rng["p50"] < np.log(10)  # three CE epochs learn something: below the loss of a uniform guess
    assert "digits" in net.provenance["loss_range"] and "calibrated" in net.provenance["loss_range"]
    assert json.loads(stdout)["loss_range"] == rng


# -- bad and hostile files ----------------------------------------------------------------------------------------
class WritesMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_file(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pth"
    state = official_state()
    if kind == "truncated":
        write_official(path, state)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-torch":
        path.write_text("hello")
    elif kind == "wrong-keys":
        state["classfier.layers.0.0.weights"] = state.pop("classfier.layers.0.0.weight")
        write_official(path, state)
    elif kind == "extra-key":
        state["feature.layer.1.weight"] = torch.zeros(3)
        write_official(path, state)
    elif kind == "wrong-shape":
        state["classfier.layers.2.0.weight"] = torch.zeros(1, 99)
        write_official(path, state)
    elif kind == "nan":
        state["feature.layer.0.bias"][7] = float("nan")
        write_official(path, state)
    elif kind == "float64":
        state["classfier.layers.1.0.bias"] = state["classfier.layers.1.0.bias"].double()
        write_official(path, state)
    elif kind == "not-a-dict":
        write_official(path, [state["feature.layer.0.bias"]])  # type: ignore[arg-type]
    elif kind == "mwnet-keys":
        write_official(path, official_state(0, "official-mwnet"))
    return path


BAD = {"truncated": "truncated or corrupt", "empty": "empty", "not-torch": "not a readable torch state_dict",
       "wrong-keys": "missing key 'classfier.layers.0.0.weight'", "extra-key": "unexpected key 'feature.layer.1",
       "wrong-shape": "classfier.layers.2.0.weight has shape (1, 99)", "nan": "feature.layer.0.bias contains NaN",
       "float64": "classfier.layers.1.0.bias has dtype torch.float64", "not-a-dict": "not a state_dict",
       "mwnet-keys": "missing key 'feature.layer.0.weight'", "missing": "no file at"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_one_error_line_exit_2(kind, tmp_path, capsys):
    path = tmp_path / "nope.pth" if kind == "missing" else _bad_file(kind, tmp_path)
    out = tmp_path / "out"
    code, _, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out)], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD[kind] in lines[0], stderr
    assert not out.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle", "raw-pickle-protocol-0"])
def test_pickle_payload_is_refused_and_never_runs(container, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"feature.layer.0.weight": WritesMarker(marker)}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=0 if container.endswith("-0") else 2))
    out = tmp_path / "out"
    proc = run_cli("import", "--from", "official-cmwnet", str(path), "--out", str(out))  # the real entry point
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused to load" in lines[0], proc.stderr
    assert not marker.exists() and not out.exists()
    with pytest.raises(UserError, match="refused"):  # the API refuses too
        official.from_official(path)
    assert not marker.exists()
    if container.startswith("raw-pickle"):  # positive control: the payload is live, a plain unpickle would run it
        pickle.loads(path.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("args, message", [
    (["--head-order", "1,1,0"], "not a permutation"),
    (["--head-order", "a,b"], "expected head numbers like 1,2,0"),
    (["--head-order", "1,٢,0"], "item 2 ('٢') is not an integer written with the digits 0-9"),
    (["--head-order", "1,,0"], "item 2 is empty"),
    (["--source-counts", "1,x"], "--source-counts: item 2 ('x') is not an integer"),
    (["--source-counts", "0,0,0"], "--source-counts: item 1 ('0') must be in 1.."),
    (["--source-counts", "5000,2.5,100"], "item 2 ('2.5') is not an integer"),
    (["--source-counts", "5000,,100"], "item 2 is empty"),
    (["--source-counts", "5,6"], "fewer than the 3 heads"),
    (["--method", "mwnet"], "does not fit a net with 3 head(s)"),
])
def test_bad_options(vnet_file, tmp_path, capsys, args, message):
    path, _ = vnet_file
    code, _, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(tmp_path / "o"),
                                 *args], capsys)
    assert code == 2 and stderr.startswith("error: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_refuses_a_non_empty_out_without_overwrite(vnet_file, tmp_path, capsys):
    path, _ = vnet_file
    out = tmp_path / "art"
    assert call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out)], capsys)[0] == 0
    code, _, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = call_main(["import", "--from", "official-cmwnet", str(path), "--out", str(out),
                                 "--head-order", "0,1,2", "--overwrite"], capsys)
    assert code == 0, stderr
    assert CMWNet.from_pretrained(str(out)).provenance["head_order"] == "0,1,2"


def test_dataparallel_prefix_and_other_head_counts(tmp_path):
    torch.manual_seed(1)
    module = OfficialVNet(hidden=8, heads=2)
    state = {f"module.{k}": v for k, v in module.state_dict().items()}
    path = write_official(tmp_path / "dp.pth", state)
    with pytest.raises(UserError, match="no default order is known"):
        official.from_official(path, source_counts="1,2,30,31")
    net = official.from_official(path, head_order="1,0", source_counts="1,2,30,31")
    plain = {k[len("module."):]: v for k, v in state.items()}
    for toolkit_head, official_head in enumerate((1, 0)):
        np.testing.assert_allclose(net.curves(LOSS_GRID)[toolkit_head],
                                   official_weights(plain, official_head, LOSS_GRID), rtol=0, atol=1e-6)

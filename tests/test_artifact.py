import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmw_transfer.artifact import fileformat
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from tests.helpers import make_net


def test_forward_matches_per_sample_heads():
    net = make_net()
    loss = torch.rand(50) * 5
    fam = torch.randint(0, 3, (50,))
    w = net(loss, fam)
    for i in range(50):  # the reference: the authors' per-sample loop over separate heads
        h = torch.relu(net.trunk(loss[i].view(1, 1)))
        expected = torch.sigmoid(h @ net.heads.weight[fam[i]] + net.heads.bias[fam[i]])
        torch.testing.assert_close(w[i], expected.squeeze())
    assert w.shape == (50,) and torch.all((w >= 0) & (w <= 1))


def test_k1_is_mwnet_without_family():
    net = make_net(num_heads=1)
    loss = torch.linspace(0, 5, 11)
    torch.testing.assert_close(net(loss), net(loss, torch.zeros(11, dtype=torch.long)))
    with pytest.raises(ValueError):
        make_net(num_heads=3)(loss)


def test_gradient_flows_to_net_not_to_loss_input():
    net = make_net()
    loss = torch.rand(8, requires_grad=True)
    net(loss.detach(), torch.zeros(8, dtype=torch.long)).sum().backward()
    assert loss.grad is None and net.trunk.weight.grad is not None


def test_roundtrip_directory_bit_exact(tmp_path):
    net = make_net()
    net.provenance = {"source": "digits-pmd", "seed": 3}
    net.save_pretrained(tmp_path / "net")
    assert {p.name for p in (tmp_path / "net").iterdir()} == {"model.safetensors", "config.json", "README.md",
                                                          "curves.png"}
    loaded = CMWNet.from_pretrained(str(tmp_path / "net"))
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.config() == net.config()
    card = (tmp_path / "net" / "README.md").read_text()
    assert "digits-pmd" in card and "| small |" in card


def test_lone_safetensors_file_is_self_describing(tmp_path):
    net = make_net(num_heads=2, centers=[5.0, 50.0])
    net.save_safetensors(tmp_path / "w.safetensors")
    loaded = CMWNet.from_pretrained(str(tmp_path / "w.safetensors"))
    assert loaded.centers == [5.0, 50.0] and loaded.num_heads == 2
    torch.testing.assert_close(loaded(torch.ones(3), torch.ones(3, dtype=torch.long)),
                               net(torch.ones(3), torch.ones(3, dtype=torch.long)), rtol=0, atol=0)


def test_saving_requires_centers(tmp_path):
    with pytest.raises(UserError, match="centers"):
        CMWNet().save_safetensors(tmp_path / "x.safetensors")


# -- bad files: each must be a UserError that says what is wrong ----------------------------------------------------
def _write(tmp_path, tensors, metadata):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _good(tmp_path):
    path = tmp_path / "good.safetensors"
    make_net().save_safetensors(path)
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    return load_file(str(path)), metadata, path


def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        CMWNet.from_pretrained(str(tmp_path / "e.safetensors"))


def test_truncated_file(tmp_path):
    _, _, path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors"):
        CMWNet.from_pretrained(str(path))


def test_missing_metadata(tmp_path):
    tensors, _, _ = _good(tmp_path)
    with pytest.raises(UserError, match="no 'cmw_transfer.config'"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, {"format": "pt"})))


def test_garbled_metadata(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    meta[fileformat.CONFIG_KEY] = "{not json"
    with pytest.raises(UserError, match="not valid JSON"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_unknown_format_version(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    cfg = json.loads(meta[fileformat.CONFIG_KEY])
    cfg["format_version"] = 99
    meta[fileformat.CONFIG_KEY] = json.dumps(cfg)
    meta[fileformat.VERSION_KEY] = "99"
    with pytest.raises(UserError, match="newer than this cmw-transfer supports"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_wrong_shape(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    tensors["heads.weight"] = torch.zeros(2, tensors["heads.weight"].shape[1])
    with pytest.raises(UserError, match="heads.weight has shape"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_wrong_dtype(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    tensors["trunk.bias"] = tensors["trunk.bias"].double()
    with pytest.raises(UserError, match="dtype"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_nan_weights(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    tensors["trunk.weight"][3, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_missing_tensor(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    del tensors["heads.bias"]
    with pytest.raises(UserError, match="do not match"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_unsorted_centers(tmp_path):
    tensors, meta, _ = _good(tmp_path)
    cfg = json.loads(meta[fileformat.CONFIG_KEY])
    cfg["centers"] = [30.0, 10.0, 90.0]
    meta[fileformat.CONFIG_KEY] = json.dumps(cfg)
    with pytest.raises(UserError, match="strictly ascending"):
        CMWNet.from_pretrained(str(_write(tmp_path, tensors, meta)))


def test_config_json_contradicting_header(tmp_path):
    make_net().save_pretrained(tmp_path / "n")
    cfg = json.loads((tmp_path / "n" / "config.json").read_text())
    cfg["centers"] = [1.0, 2.0, 3.0]
    (tmp_path / "n" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config.json says centers"):
        CMWNet.from_pretrained(str(tmp_path / "n"))


def test_curves_shape_and_range():
    net = make_net()
    curves = net.curves(np.linspace(0, 10, 21))
    assert curves.shape == (3, 21) and np.all((curves >= 0) & (curves <= 1))

"""The shipped nets: valid artifacts, loadable by name, and regenerated bit-exactly by their script."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmw_transfer import CMWNet
from cmw_transfer.weights.spec import list_pretrained

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("cmwnet-digits-pmd", "cmwnet-sl-digits-pmd", "mwnet-digits-pmd")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_net_loads_with_its_story(name):
    assert name in list_pretrained()
    net = CMWNet.from_pretrained(f"pretrained:{name}")
    assert net.provenance["source"] == "digits-pmd"
    assert net.num_heads == (1 if name.startswith("mwnet") else 3)
    curves = net.curves([0.0, 8.0])
    assert ((curves >= 0) & (curves <= 1)).all()


def test_cmwnet_digits_pmd_down_weights_large_losses_in_the_noisy_family():
    """On digits-pmd the large classes receive the flipped labels; their head must fall with the loss."""
    net = CMWNet.from_pretrained("pretrained:cmwnet-digits-pmd")
    large = net.curves([0.1, 2.0, 6.0])[2]
    assert large[0] > large[1] > large[2]


def test_regenerated_exactly(tmp_path):
    env = {**os.environ, "PRETRAINED_DIR": str(tmp_path), "CMW": f"{sys.executable} -m cmw_transfer"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "make_pretrained.sh"), "cmwnet-digits-pmd"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    shipped = REPO / "pretrained" / "cmwnet-digits-pmd"
    for file in ("model.safetensors", "config.json", "README.md"):
        assert digest(tmp_path / "cmwnet-digits-pmd" / file) == digest(shipped / file), file

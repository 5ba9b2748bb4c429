"""The shipped nets: valid artifacts, loadable by name, and reproducible by their script.

What reproduction guarantees (README, "The shipped nets"): on one machine, regeneration is bit-exact; on
another CPU the source labels are bit-identical (tests/test_bias_digest.py) but training floats are not, so the
regenerated net matches the shipped one in what a user relies on: the same class-size families, weight curves
within CURVE_TOLERANCE on the loss grid (NOISY_HEAD_TOLERANCE on the heads of the families that hold the noise)
and a clean-vs-noisy AUC within AUC_TOLERANCE.

Measured spread of cmwnet-digits-pmd over three CPU paths (the shipped net, ATen's default and AVX2 kernels on an
AMD EPYC, ``ATEN_CPU_CAPABILITY``): the worst pair differs by 0.189, all of it in head 0 (the small family, which
holds no flipped labels) at the top of the loss grid, where that head's curve is barely constrained by data (0.62 vs
0.43 at loss 6); heads 1 and 2 differ by at most 0.027 anywhere, the AUC by 0.0014. The machine the nets were
made on saw a 0.06 spread, so a bound of "a few times the spread" does not hold on every CPU: the bounds are set
above the worst measured pair, with the tighter one where the weights matter (the noisy families).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmw_transfer import CMWNet
from cmw_transfer.weights.spec import list_pretrained

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("cmwnet-digits-pmd", "cmwnet-sl-digits-pmd", "mwnet-digits-pmd", "cmwnet-fashion-mnist-pmd",
           "mwnet-fashion-mnist-pmd")
CURVE_TOLERANCE = 0.25  # worst measured pair 0.189 (head 0, loss 6)
NOISY_HEAD_TOLERANCE = 0.06  # heads 1-2 (the families whose labels PMD flips): worst measured pair 0.027
AUC_TOLERANCE = 0.03
LOSS_GRID = np.linspace(0.0, 6.0, 25)
# metatrain --src fashion-mnist-pmd: 100 clean images per class held out, then PMD-I 35% + asym 30% (machine-stable)
FASHION_META_SOURCE = "c039de7cbc4ebb47"
# The Fashion-MNIST nets take about 10 minutes each to regenerate (one thread): only with this variable set
# (.ci/run sets it).
FASHION_REGEN = "CMW_TEST_FASHION_REGEN"
FASHION_CURVE_TOLERANCE = 0.15  # as digits; measured 0.074 (AUC 0.0096) on ATen's default kernels vs AVX-512


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_net_loads_with_its_story(name):
    assert name in list_pretrained()
    net = CMWNet.from_pretrained(f"pretrained:{name}")
    assert net.provenance["source"] == ("fashion-mnist-pmd" if "fashion" in name else "digits-pmd")
    assert net.num_heads == (1 if name.startswith("mwnet") else 3)
    curves = net.curves([0.0, 8.0])
    assert ((curves >= 0) & (curves <= 1)).all()
    if "fashion" in name:
        assert net.provenance["source_labels_digest"] == FASHION_META_SOURCE
        assert net.provenance["backbone"] == "lenet"


@pytest.mark.parametrize("name", ["cmwnet-digits-pmd", "cmwnet-fashion-mnist-pmd"])
def test_cmwnet_down_weights_large_losses_in_the_noisy_family(name):
    """On the *-pmd sources the large classes receive the flipped labels; their head must fall with the loss."""
    net = CMWNet.from_pretrained(f"pretrained:{name}")
    large = net.curves([0.1, 2.0, 6.0])[2]
    assert large[0] > large[1] > large[2]


def _regenerate(dest: Path, name: str, timeout: int = 600, **env) -> Path:
    env = {**os.environ, "PRETRAINED_DIR": str(dest), "CMW": f"{sys.executable} -m cmw_transfer", **env}
    out = subprocess.run(["bash", str(REPO / "scripts" / "make_pretrained.sh"), name], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return dest / name


def _last_auc(run: Path) -> float:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["clean_noisy_auc"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """cmwnet-digits-pmd made twice here, on ATen's plain (non-vectorised) CPU kernels: another CPU path than
    the one the shipped net was made on."""
    return [_regenerate(tmp_path_factory.mktemp(f"regen{i}"), "cmwnet-digits-pmd", ATEN_CPU_CAPABILITY="default")
            for i in range(2)]


def test_regeneration_is_bit_exact_on_one_machine(regenerated):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def metrics(run):  # every logged number except the wall-clock time
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    first, second = regenerated
    for file in ("model.safetensors", "config.json", "README.md"):
        assert digest(first / file) == digest(second / file), file
    assert metrics(first) == metrics(second)


def test_regenerated_net_matches_the_shipped_one_in_what_matters(regenerated):
    shipped_dir = REPO / "pretrained" / "cmwnet-digits-pmd"
    shipped, regen = CMWNet.from_pretrained(shipped_dir), CMWNet.from_pretrained(regenerated[0])
    assert np.allclose(regen.centers, shipped.centers, rtol=0, atol=1e-9)  # identical labels -> same families
    assert regen.provenance == shipped.provenance
    gaps = np.abs(regen.curves(LOSS_GRID) - shipped.curves(LOSS_GRID)).max(axis=1)  # per head
    assert gaps.max() <= CURVE_TOLERANCE, f"weight curves differ by {gaps.max():.3f} > {CURVE_TOLERANCE}"
    assert gaps[1:].max() <= NOISY_HEAD_TOLERANCE, f"noisy-family heads differ by {gaps[1:].max():.3f}"
    assert abs(_last_auc(regenerated[0]) - _last_auc(shipped_dir)) <= AUC_TOLERANCE


# --- the Fashion-MNIST nets: only with CMW_TEST_FASHION_REGEN=1 (and the real files; not marked real_data, so that
# .ci/run's "no real-data test skipped" holds without the minutes these take) -----------------------------------
fashion_regen = pytest.mark.skipif(os.environ.get(FASHION_REGEN) != "1",
                                   reason=f"regenerating a Fashion-MNIST net takes minutes: set {FASHION_REGEN}=1")


@pytest.fixture(scope="module")
def fashion_cache(tmp_path_factory):
    """One eta cache for the module's regenerations: the source's eta is computed once, never in the user's cache."""
    return tmp_path_factory.mktemp("eta-cache")


@fashion_regen
def test_fashion_regeneration_is_bit_exact_on_one_machine(fashion_dir, fashion_cache, tmp_path):
    """A shortened recipe (one CE epoch, one meta epoch), made twice: the same bytes."""
    runs = [_regenerate(tmp_path / f"short{i}", "cmwnet-fashion-mnist-pmd", 3600, CMW_CACHE_DIR=str(fashion_cache),
                        EXTRA_ARGS="--epochs 2 --warmup-epochs 1") for i in range(2)]
    for file in ("model.safetensors", "config.json", "README.md"):
        assert (runs[0] / file).read_bytes() == (runs[1] / file).read_bytes(), file
    assert CMWNet.from_pretrained(runs[0]).provenance["source_labels_digest"] == FASHION_META_SOURCE


@fashion_regen
def test_fashion_net_regenerated_on_another_cpu_path_matches_the_shipped_one(fashion_dir, fashion_cache, tmp_path):
    shipped_dir = REPO / "pretrained" / "cmwnet-fashion-mnist-pmd"
    regen_dir = _regenerate(tmp_path, "cmwnet-fashion-mnist-pmd", 7200, ATEN_CPU_CAPABILITY="default",
                            CMW_CACHE_DIR=str(fashion_cache))
    shipped, regen = CMWNet.from_pretrained(shipped_dir), CMWNet.from_pretrained(regen_dir)
    assert np.allclose(regen.centers, shipped.centers, rtol=0, atol=1e-9)  # identical labels -> same families
    assert regen.provenance == shipped.provenance
    gap = np.abs(regen.curves(LOSS_GRID) - shipped.curves(LOSS_GRID)).max()
    assert gap <= FASHION_CURVE_TOLERANCE, f"weight curves differ by {gap:.3f} > {FASHION_CURVE_TOLERANCE}"
    assert abs(_last_auc(regen_dir) - _last_auc(shipped_dir)) <= AUC_TOLERANCE

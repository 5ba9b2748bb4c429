"""CurveNet: the probe's loss curves, their class normalisation, the CurveNet meta-gradient, the artifact, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm.optim
import torch
import torch.nn.functional as F  # noqa: N812
from numpy.lib.format import open_memmap
from torch.func import functional_call

from cmw_transfer.artifact.curvenet import CurveNet, artifact_method
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.dataset import create_dataset
from cmw_transfer.errors import UserError
from cmw_transfer.models import create_model
from cmw_transfer.trainer.config import CurveNetConfig, ProbeConfig
from cmw_transfer.trainer.curvenet.probe import cyclical_lr
from cmw_transfer.trainer.engine.launch import run_stage
from cmw_transfer.trainer.engine.loaders import derive_seed
from cmw_transfer.trainer.meta.metastep import VirtualStep, meta_gradient, virtual_names
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE
from cmw_transfer.weighting.curves import CurveFeatures, class_curve_stats, load_curves, resample
from tests.faults import kill_command
from tests.helpers import call_main, launch
from tests.reference import naive_meta_gradient

PROBE = dict(dataset="digits", imbalance=10.0, noise="sym:0.4", epochs=5, batch_size=64, workers=0, device="cpu",
             progress=False)


def _probe(out: Path, **kw) -> dict:
    return run_stage(ProbeConfig(out=str(out), **{**PROBE, **kw}))


# -- the probe --------------------------------------------------------------------------------------------------------
def test_cyclical_schedule_is_the_papers_on_cifar():
    """300 epochs, lr 0.1, drop at 120, then 1e-2 / 1e-3 toggling every 15 epochs (recognition_cycle.py)."""
    lr = [cyclical_lr(e, 300, 0.1, 0.4, 0.05, 0.1, 0.01) for e in range(300)]
    assert lr[:120] == [0.1] * 120
    assert np.allclose(lr[120:135], 0.01) and np.allclose(lr[135:150], 0.001) and np.allclose(lr[150:165], 0.01)
    assert np.allclose(lr[285:300], 0.001)


def test_probe_array_equals_an_independent_recomputation(tmp_path):
    _probe(tmp_path / "p")
    curves = load_curves(tmp_path / "p")
    ds = create_dataset("digits", None, "train", seed=0, noise="sym:0.4", imbalance=10.0)
    assert curves.losses.shape == (len(ds), 5) and curves.losses.dtype == np.float16
    np.testing.assert_array_equal(curves.labels, ds.targets)
    # a plain loop: same init, optimizer, sample order and lr per epoch, every sample's loss before the step
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    opt = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    expected = np.zeros((len(ds), 5), dtype=np.float32)
    for epoch, lr in enumerate([0.05, 0.05, 0.005, 0.0005, 0.005]):
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(derive_seed(0, epoch, 0))
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0 + epoch)).numpy()
        model.train()
        for start in range(0, len(ds), 64):
            idx = order[start:start + 64]
            x = torch.stack([ds[int(i)][0] for i in idx])
            y = torch.as_tensor(ds.targets[idx])
            losses = F.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
            expected[idx, epoch] = losses.detach().numpy()
    assert (expected > 0).all()  # every sample, every epoch (the last, partial batch included)
    np.testing.assert_allclose(curves.losses.astype(np.float32), expected, rtol=2e-3, atol=1e-4)


def test_probe_resumed_after_kill_9_is_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["probe", "--dataset", "digits", "--imbalance", "10", "--noise", "sym:0.4", "--epochs", "4",
            "--workers", "0", "--device", "cpu", "--quiet"]
    _probe(tmp_path / "ref", epochs=4)  # uninterrupted, in-process (one thread, as the subprocesses)
    killed = subprocess.run(kill_command("3:4", *args, "--out", str(tmp_path / "run")), capture_output=True,
                            text=True, env=env, timeout=300)
    assert killed.returncode == -9
    assert not json.loads((tmp_path / "run" / "probe.json").read_text())["complete"]
    with pytest.raises(UserError, match="has not finished"):
        load_curves(tmp_path / "run")
    resumed = subprocess.run([sys.executable, "-m", "cmw_transfer", *args, "--out", str(tmp_path / "run"),
                              "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_curves(tmp_path / "ref").losses, load_curves(tmp_path / "run").losses
    assert (np.asarray(a) != 0).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_probe_under_two_gloo_processes_writes_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cmw_transfer", "probe", "--dataset", "digits", "--imbalance", "10", "--epochs", "3",
                           "--batch-size", "32", "--device", "cpu", "--quiet", "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = load_curves(tmp_path / "ddp")
    assert curves.record["world_size"] == 2
    values = np.asarray(curves.losses, dtype=np.float32)
    assert np.isfinite(values).all() and (values > 0).all()  # both shards, every epoch, no row left out


def test_probe_refuses_other_runs_and_needs_resume(tmp_path, capsys):
    _probe(tmp_path / "p", epochs=2)
    code, _, err = call_main(["probe", "--dataset", "digits", "--epochs", "2", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "--resume" in err and err.count("\n") == 1
    code, _, err = call_main(["metatrain", "--src", "digits", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "loss-curve probe" in err


# -- curve features ---------------------------------------------------------------------------------------------------
def _fake_probe(path: Path, losses: np.ndarray, labels: np.ndarray, **schedule) -> Path:
    path.mkdir(parents=True)
    mm = open_memmap(path / "losses.npy", mode="w+", dtype=np.float16, shape=losses.shape)
    mm[:] = losses
    mm.flush()
    np.save(path / "labels.npy", labels)
    sched = {"drop_fraction": 0.4, "cycle_fraction": 0.05, "cycle_high": 0.1, "cycle_low": 0.01, **schedule}
    (path / "probe.json").write_text(json.dumps({"complete": True, "schedule": {**sched, "epochs": losses.shape[1]},
                                                 "fingerprint": "x", "config": {}}))
    return path


def test_curves_are_normalised_per_observed_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=50)
    losses = (rng.random((50, 8)) * 3 + labels[:, None]).astype(np.float16)
    curves = load_curves(_fake_probe(tmp_path / "p", losses, labels))
    feats = CurveFeatures(curves, 3, skip=2)(np.arange(50))
    assert feats.shape == (50, 6)
    ref = losses.astype(np.float64)[:, 2:]
    for k in range(3):
        members = labels == k
        np.testing.assert_allclose(feats[members], ref[members] - ref[members].mean(0), atol=1e-5)
        np.testing.assert_allclose(feats[members].mean(0), 0.0, atol=1e-5)  # Eq. 7-8: zero class mean per epoch
    # chunked statistics equal one pass; a batch's rows in any order equal the same rows of the full matrix
    mean_small, std_small = class_curve_stats(curves.losses, labels, 3, chunk=7)
    mean_big, std_big = class_curve_stats(curves.losses, labels, 3)
    np.testing.assert_allclose(mean_small, mean_big) and np.testing.assert_allclose(std_small, std_big)
    idx = np.array([41, 3, 17, 3])
    np.testing.assert_allclose(CurveFeatures(curves, 3, skip=2)(idx), feats[idx])
    scaled = CurveFeatures(curves, 3, skip=2, divide_std=True)(np.arange(50))
    for k in range(3):  # the abstract's variant: unit class std per epoch
        np.testing.assert_allclose(scaled[labels == k].std(0), 1.0, atol=1e-4)


def test_resampling_keeps_the_curve_over_relative_time():
    t = np.linspace(0, 1, 11, dtype=np.float32)
    line = np.stack([2 * t + 1, -t])
    out = resample(line, 5)
    np.testing.assert_allclose(out, np.stack([2 * np.linspace(0, 1, 5) + 1, -np.linspace(0, 1, 5)]), atol=1e-6)
    assert resample(line, 11) is line


# -- the CurveNet meta-gradient -------------------------------------------------------------------------------------
@pytest.fixture
def curve_setup():
    torch.manual_seed(0)
    model = create_model("small_cnn", 4, in_chans=1).double()
    net = CurveNet(6, 4, embed_dim=4, hidden=8).double()
    torch.nn.init.normal_(net.head[-1].bias)  # off the saturated ~1 start, so every parameter has a gradient
    batch = TrainBatch(torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (12,)), torch.arange(4),
                       features=torch.randn(12, 6, dtype=torch.float64))
    meta = (torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))
    return model, net, batch, meta


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def _meta_loss(model, net, theta, batch, meta, step):
    wp, i = {}, 0
    for k, p in net.named_parameters():
        wp[k] = theta[i:i + p.numel()].view_as(p)
        i += p.numel()
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    objective = WeightedCE()
    terms = objective.terms(functional_call(model, (params, bufs), (batch.x,)), batch)
    coeff = objective.coefficients(lambda f, key: functional_call(net, wp, (f, key)), terms.detach(), batch)
    grads = torch.autograd.grad((coeff * terms).sum(), list(params.values()))
    fast = {k: step.apply(p.detach(), g, None) for (k, p), g in zip(params.items(), grads)}
    logits = functional_call(model, (fast, {k: b.clone() for k, b in model.named_buffers()}), (meta[0],))
    return F.cross_entropy(logits, meta[1]).item()


def test_curvenet_meta_gradient_equals_finite_differences_and_the_deep_copy_oracle(curve_setup):
    model, net, batch, meta = curve_setup
    step = VirtualStep(0.5)
    ours = meta_gradient(model, net, dict(model.named_parameters()), dict(model.named_buffers()), batch, *meta,
                         WeightedCE(), step, virtual_names(model, "exact"))
    got = _flat(ours.wnet_grads)
    oracle = naive_meta_gradient(model, net, batch, *meta, WeightedCE(), 0.5)
    torch.testing.assert_close(got, _flat(oracle), rtol=1e-9, atol=1e-12)
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])
    coords = torch.randperm(theta.numel(), generator=torch.Generator().manual_seed(0))[:40]
    coords = torch.cat([coords, torch.tensor([theta.numel() - 1])])  # the output bias: the dominant direction
    eps = 1e-6
    for i in coords.tolist():
        e = torch.zeros_like(theta)
        e[i] = eps
        fd = (_meta_loss(model, net, theta + e, batch, meta, step)
              - _meta_loss(model, net, theta - e, batch, meta, step)) / (2 * eps)
        assert abs(fd - got[i].item()) <= 1e-5 * abs(fd) + 1e-9, (i, fd, got[i].item())
    assert got.abs().max() > 1e-6


def test_curvenet_skip_and_famus_paths_reverse_equals_forward(curve_setup):
    """skip:N runs the reverse-mode directional derivatives: they equal the forward-mode ones on the same layers."""
    model, net, batch, meta = curve_setup
    names = virtual_names(model, "skip", 1)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    results = [meta_gradient(model, net, params, buffers, batch, *meta, WeightedCE(), VirtualStep(0.3), names,
                             derivatives=mode) for mode in ("reverse", "forward")]
    torch.testing.assert_close(_flat(results[0].wnet_grads), _flat(results[1].wnet_grads), rtol=1e-9, atol=1e-12)


# -- the artifact ---------------------------------------------------------------------------------------------------
def _transferable(length: int = 8) -> CurveNet:
    torch.manual_seed(3)
    return CurveNet(length, 3, "transferable", embed_dim=16, curve_skip=5, centers=[20.0, 60.0, 100.0],
                    probe={"drop_fraction": 0.4, "cycle_fraction": 0.05, "cycle_high": 0.1, "cycle_low": 0.01,
                           "epochs": 20})


def test_transferable_artifact_round_trips_and_refuses_a_wrong_length(tmp_path):
    net = _transferable()
    net.save_pretrained(tmp_path / "a")
    again = CurveNet.from_pretrained(tmp_path / "a")
    assert again.config() == net.config() and artifact_method(str(tmp_path / "a")) == "curvenet"
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x, key = torch.randn(5, 8), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(net(x, key), again(x, key))
    w = CurveNet(8, 3).eval()(x, key)  # a fresh net starts at weights ~1, inside (bias, factor + bias)
    assert ((w > 0.98) & (w < 1.02)).all()
    again.save_pretrained(tmp_path / "b")  # same net, same bytes
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="length 8") as exc:
        again(torch.randn(5, 9), key)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError):  # not a CMW-Net: refused, not misread
        CMWNet.from_pretrained(str(tmp_path / "a"))


def test_apply_with_a_curvenet_needs_the_probe_and_uses_it(tmp_path, capsys):
    _transferable().save_pretrained(tmp_path / "net")
    base = ["apply", "--dataset", "digits", "--imbalance", "10", "--weights", str(tmp_path / "net"), "--model",
            "small_cnn", "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress"]
    code, _, err = call_main([*base, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "cmw-transfer probe --dataset digits --imbalance 10" in err and err.count("\n") == 1
    _probe(tmp_path / "curves", noise=None, epochs=4)
    code, out, err = call_main([*base, "--curves", str(tmp_path / "curves"), "--out", str(tmp_path / "a"),
                                "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["final"]["test_top1"] > 0
    _probe(tmp_path / "other", noise=None, epochs=4, cycle_low=0.02)  # another schedule: refused
    code, _, err = call_main([*base, "--curves", str(tmp_path / "other"), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "cycle_low" in err


# -- the allocate stage -----------------------------------------------------------------------------------------------
def test_allocate_stage_stops_meta_updates_and_exports(tmp_path):
    _probe(tmp_path / "curves", meta_set="clean:10", epochs=8, noise="sym:0.4")
    cfg = CurveNetConfig(src="digits", out=str(tmp_path / "run"), noise="sym:0.4", imbalance=10.0,
                         curves=str(tmp_path / "curves"), curvenet_mode="transferable", curve_length=6, epochs=3,
                         meta_stop_epoch=1, sched="multistep", warmup_epochs=0, device="cpu", meta_grad="skip:1")
    trainer = launch(cfg)
    summary = trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["meta_steps"] > 0 and [r["meta_steps"] for r in rows[1:]] == [0, 0]
    assert summary["meta_stop_epoch"] == 1
    net = CurveNet.from_pretrained(tmp_path / "run")
    assert net.mode == "transferable" and net.curve_length == 6 and net.probe["epochs"] == 8
    bank = np.load(tmp_path / "run" / "weights.npy")
    assert bank.shape == (len(trainer.stage.data.train),) and ((bank > 0.02) & (bank < 1.02)).all()
    wrong = CurveNetConfig(src="digits", out=str(tmp_path / "run2"), imbalance=10.0,
                           curves=str(tmp_path / "curves"), epochs=2, device="cpu")
    with pytest.raises(UserError, match="another training set"):  # probed with noise, this run has none
        launch(wrong)

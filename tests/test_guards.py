"""The guards that keep a frozen net from wrecking a target run (cmw_transfer.weighting.guards)."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmw_transfer import CMWNet
from cmw_transfer.weighting.guards import (
    AUTO_CAP,
    READY_FRACTION,
    ClassWeightMonitor,
    LossRangeMonitor,
    WarmupGate,
    describe_range_sides,
    lift_class_floor,
    long_tail_advice,
    reference_weight,
)


@pytest.mark.parametrize("seed", range(5))
def test_class_floor_lifts_every_class_and_keeps_the_order_inside_it(seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 6, (200,), generator=g)
    weights = torch.rand(200, generator=g)
    weights[targets == 2] *= 0.01  # a class the net all but switches off
    floor = 0.5
    lifted = lift_class_floor(weights, targets, 6, floor)
    assert ((lifted >= 0) & (lifted <= 1)).all()
    batch_mean = weights.mean()
    for c in range(6):
        member = targets == c
        if not member.any():
            continue
        assert lifted[member].mean() >= floor * batch_mean - 1e-6
        order, lifted_order = torch.argsort(weights[member]), torch.argsort(lifted[member])
        assert torch.equal(order, lifted_order)  # strictly increasing map: the same ranking
        if weights[member].mean() >= floor * batch_mean:
            assert torch.equal(lifted[member], weights[member])  # classes above the floor are untouched


def test_class_floor_zero_is_the_identity():
    w, y = torch.rand(50), torch.randint(0, 3, (50,))
    assert torch.equal(lift_class_floor(w, y, 3, 0.0), w)


def _loss_stream(start, end, epochs):
    """Per-epoch would-be weights of a target whose losses fall from ln C towards the source's regime."""
    return np.linspace(start, end, epochs)


def test_warmup_gate_waits_for_the_net_to_trust_the_target():
    gate = WarmupGate("auto", epochs=40, reference=0.8)
    means = _loss_stream(0.05, 0.8, 40)  # mean weight the net would give, epoch by epoch
    started = None
    for epoch, m in enumerate(means, start=1):
        assert gate.applies(epoch) == (started is not None and epoch >= started)
        if not gate.applies(epoch):
            gate.observe(torch.full((64,), float(m)))
        gate.end_epoch(epoch)
        if started is None and gate.start_epoch is not None:
            started = gate.start_epoch
    first_ready = 1 + int(np.argmax(means >= READY_FRACTION * 0.8))
    assert started == min(first_ready + 1, gate.cap_epoch)


def test_warmup_gate_cap_and_never_the_first_epoch():
    gate = WarmupGate("auto", epochs=20, reference=0.9)
    for epoch in range(1, 21):
        if not gate.applies(epoch):
            gate.observe(torch.full((8,), 0.01))  # never ready
        gate.end_epoch(epoch)
    assert gate.start_epoch == gate.cap_epoch == int(np.ceil(AUTO_CAP * 20)) + 1
    ready_at_once = WarmupGate("auto", epochs=20, reference=0.1)
    assert not ready_at_once.applies(1)
    ready_at_once.observe(torch.ones(8))
    ready_at_once.end_epoch(1)
    assert ready_at_once.start_epoch == 2


def test_warmup_gate_fixed_count_and_no_range():
    assert WarmupGate(3, epochs=10).start_epoch == 4
    assert WarmupGate(0, epochs=10).applies(1)
    no_range = WarmupGate("auto", epochs=40, reference=None)
    assert no_range.start_epoch == no_range.cap_epoch


def test_reference_weight_is_the_net_at_the_source_median():
    net = CMWNet(hidden_size=8, num_heads=3)
    heads = torch.tensor([0, 2, 2])
    ref = reference_weight(net, {"p50": 0.3}, heads)
    expected = net(torch.tensor([0.3, 0.3]), torch.tensor([0, 2])).mean().item()
    assert ref == pytest.approx(expected)
    assert reference_weight(net, None, heads) is None


def test_class_weight_monitor_names_the_starved_class():
    mon = ClassWeightMonitor(4)
    y = torch.arange(4).repeat(25)
    w = torch.where(y == 3, 0.02, 0.6)
    mon.observe(w, y)
    assert mon.starved() == [3]
    assert mon.class_means()[0] == pytest.approx(0.6)


def test_loss_range_monitor_unchecked_without_range():
    mon = LossRangeMonitor(None)
    mon.observe(torch.rand(10))
    assert mon.report() == {"loss_range_check": "unchecked"}
    mon = LossRangeMonitor({"min": 0.1, "max": 1.0})
    mon.observe(torch.tensor([0.05, 0.5, 0.7, 2.0]))
    assert mon.report()["frac_outside_range"] == pytest.approx(0.5)


def test_loss_range_monitor_counts_both_sides_and_the_warning_names_them():
    mon = LossRangeMonitor({"min": 0.1, "max": 1.0})
    mon.observe(torch.tensor([0.001, 0.01, 0.05, 0.5, 0.1, 1.0]))  # three too confident, none too hard
    mon.observe(torch.tensor([3.0, 0.5]))
    report = mon.report()
    assert report["frac_below_range"] == pytest.approx(3 / 8)
    assert report["frac_above_range"] == pytest.approx(1 / 8)
    assert report["frac_outside_range"] == pytest.approx(4 / 8)  # the bounds themselves are inside
    assert describe_range_sides(report) == "12.5% above its maximum, 37.5% below its minimum"
    mon.observe(torch.tensor([0.0, 0.0, 0.5, 0.5]))
    below_only = mon.report()  # reset after each report: only this epoch's losses
    assert below_only["frac_above_range"] == 0 and describe_range_sides(below_only) == "50.0% below its minimum"


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        rng = LossRangeMonitor({"min": 0.0, "max": 1.0})
        rng.observe(torch.tensor([2.0, 2.0, 2.0]) if rank == 0 else torch.tensor([0.5]))  # 3 of 4 outside
        mon = ClassWeightMonitor(2)
        mon.observe(torch.tensor([1.0]) if rank == 0 else torch.tensor([0.0]), torch.tensor([rank]))
        mon.reduce()
        out[rank] = (rng.report()["frac_outside_range"], mon.class_means())
    finally:
        dist.destroy_process_group()


def test_loss_range_and_class_means_are_reduced_over_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in (0, 1):
        frac, means = out[rank]
        assert frac == pytest.approx(0.75)  # rank 0 alone would say 1.0, rank 1 alone 0.0
        assert means == [1.0, 0.0]


def _digits_criterion(**kwargs):
    from cmw_transfer import CMWLoss

    counts = [100, 100, 100, 100, 100, 40, 40, 40, 10, 10]
    return CMWLoss.from_spec("pretrained:cmwnet-digits-pmd", class_counts=counts, **kwargs)


def test_cmwloss_auto_warmup_is_plain_ce_until_the_net_is_ready():
    criterion = _digits_criterion(warmup="auto", epochs=20)
    logits, y = torch.zeros(32, 10, requires_grad=True), torch.randint(0, 10, (32,))  # every loss = ln 10
    loss = criterion(logits, y)
    assert loss.item() == pytest.approx(np.log(10), rel=1e-6)  # epoch 1 is never weighted
    report = criterion.end_epoch()
    assert report["weighting"] is False and report["would_be_mean_weight"] is not None
    confident = torch.nn.functional.one_hot(y, 10).float() * 12  # losses near 0: the net trusts them
    criterion(confident, y)
    report = criterion.end_epoch()
    assert criterion.gate.start_epoch is not None


def test_cmwloss_floor_and_monitor_in_the_training_loss():
    criterion = _digits_criterion(min_class_weight=0.5)
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    criterion(logits, y)
    report = criterion.end_epoch()
    means = [m for m in report["class_mean_weight"] if m is not None]
    assert min(means) >= 0.5 * np.mean(means) * 0.5  # floored per batch: no class near zero
    assert report["loss_range_check"] == "checked"


def test_long_tail_advice_only_for_a_tail_far_stronger_than_the_source():
    balanced_source = [85.8, 150.75, 215.0]  # the shipped digits nets' class-size centers
    tail = [200, 120, 80, 40, 20, 10, 4]  # IF 50
    assert long_tail_advice([150 + d for d in range(-10, 10)], balanced_source) is None
    assert long_tail_advice(np.round(180 * 10.0 ** (-np.arange(10) / 9)), balanced_source) is None  # IF 10
    message = long_tail_advice(tail, balanced_source)
    assert message is not None and "imbalance factor 50" in message and "--weighting class-balanced" in message
    assert long_tail_advice(tail, [4.0, 40.0, 180.0]) is None  # the net was meta-trained on such a tail
    assert long_tail_advice([*tail, 0, 0], balanced_source) == message  # empty classes are not the tail
    assert long_tail_advice([5, 0, 0]) is None
    if_10 = np.round(180 * 10.0 ** (-np.arange(10) / 9))
    assert long_tail_advice(if_10, [150.0], num_heads=1) is not None  # one curve for every class: warned earlier
    assert long_tail_advice(np.round(180 * 5.0 ** (-np.arange(10) / 9)), [150.0], num_heads=1) is None


def test_long_tail_advice_reaches_the_apply_run_and_the_plug_in_loss(tmp_path, capsys):
    from cmw_transfer import CMWLoss
    from cmw_transfer.cli import main

    net = CMWNet.from_pretrained("pretrained:cmwnet-digits-pmd")
    tail = [200, 120, 80, 40, 20, 10, 4, 4, 4, 4]
    from cmw_transfer import sample_weights

    for build in (lambda: CMWLoss.from_net(net, tail), lambda: CMWLoss.from_spec("pretrained:cmwnet-digits-pmd", tail),
                  lambda: sample_weights([0.1, 2.0], [0, 9], tail, net)):
        with pytest.warns(UserWarning, match="strong long tail") as caught:
            build()
        assert caught[0].filename == __file__  # pointed at the user's line, not the library's
    with pytest.raises(SystemExit) as exc:
        main(["apply", "--dataset", "digits", "--imbalance", "50", "--weights", "pretrained:cmwnet-digits-pmd",
              "--model", "small_cnn", "--epochs", "1", "--no-progress", "--workers", "0", "--out",
              str(tmp_path / "run")])
    assert exc.value.code == 0
    err = capsys.readouterr().err
    assert err.count("strong long tail") == 1 and "--weighting class-balanced" in err
    families = (tmp_path / "run" / "families.json").read_text()
    assert "strong long tail" in families

"""Shared training plumbing: devices, reproducible loaders, timm factories, the single-process context."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cmw_transfer.errors import UserError
from cmw_transfer.trainer.engine.distributed import DistributedContext, resolve_device
from cmw_transfer.trainer.engine.loaders import ShardSampler, derive_seed, make_loader, seed_everything
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    assert resolve_device("auto") == resolve_device(None)
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


def test_seed_everything_and_derive_seed():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    assert 0 <= derive_seed(2**40, 5) < 2**63


def _order(loader):
    return [int(v) for batch in loader for v in batch[0]]


def test_train_loader_order_is_a_function_of_seed_and_epoch_only():
    ds = TensorDataset(torch.arange(20))
    loader = make_loader(ds, 4, train=True, workers=0, seed=5, distributed=False, collate_fn=None)
    loader.set_epoch(0)
    e0 = _order(loader)
    loader.set_epoch(1)
    e1 = _order(loader)
    fresh = make_loader(ds, 4, train=True, workers=0, seed=5, distributed=False, collate_fn=None)
    fresh.set_epoch(1)  # a resumed run jumps straight to epoch 1
    assert _order(fresh) == e1 != e0
    assert sorted(e0) == list(range(20))
    other = make_loader(ds, 4, train=True, workers=0, seed=6, distributed=False, collate_fn=None)
    assert _order(other) != e0


def test_train_loader_drops_the_ragged_batch_but_eval_keeps_everything():
    ds = TensorDataset(torch.arange(10))
    assert len(make_loader(ds, 4, train=True, workers=0, seed=0, distributed=False, collate_fn=None)) == 2
    evl = make_loader(ds, 4, train=False, workers=0, seed=0, distributed=False, collate_fn=None)
    assert _order(evl) == list(range(10))
    tiny = make_loader(TensorDataset(torch.arange(3)), 4, train=True, workers=0, seed=0, distributed=False,
                       collate_fn=None)
    assert len(tiny) == 1  # a set smaller than a batch still trains


def test_shard_sampler_partitions_without_padding():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_timm_factories_and_their_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt, sched = create_optimizer_and_scheduler(model, opt="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9,
                                                sched="cosine", epochs=2, warmup_lr_epochs=0, steps_per_epoch=5)
    assert isinstance(opt, torch.optim.SGD)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-4}  # no decay on bias / norm
    sched.step_update(num_updates=5)
    mid = opt.param_groups[0]["lr"]
    sched.step_update(num_updates=10)
    assert 0.1 > mid > opt.param_groups[0]["lr"] >= 0.0
    _, none = create_optimizer_and_scheduler(model, opt="adamw", lr=1e-3, sched="none")
    assert none is None
    with pytest.raises(UserError, match="--opt"):
        create_optimizer_and_scheduler(model, opt="nosuchopt", lr=0.1)
    with pytest.raises(UserError, match="--sched"):
        create_optimizer_and_scheduler(model, sched="sometimes", lr=0.1)
    with pytest.raises(UserError, match="--lr"):
        create_optimizer_and_scheduler(model, lr=0.0)


def test_single_process_context_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with DistributedContext.from_env("cpu") as ctx:
        assert ctx.is_main and not ctx.enabled and ctx.world_size == 1
        assert torch.equal(ctx.all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert float(ctx.all_reduce_mean(4.0)) == 4.0
        assert ctx.all_gather_object("x") == ["x"] and ctx.broadcast_object(3) == 3
        ctx.barrier()

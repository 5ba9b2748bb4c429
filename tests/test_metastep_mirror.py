"""``--mirror-optimizer``: the virtual step is the real optimizer's next step, for every optimizer it accepts."""

import pytest
import timm.optim
import torch
import torch.nn.functional as F  # noqa: N812
from torch.func import functional_call

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from cmw_transfer.models import create_model
from cmw_transfer.trainer.meta.metastep import meta_gradient, virtual_names, virtual_step_from_optimizer
from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE


def tiny():
    torch.manual_seed(0)
    return create_model("small_cnn", 4, in_chans=1).double()


def grads_at(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, list(model.parameters()))


OPTIMIZERS = {
    "sgd-plain": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "sgd-momentum-wd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                              weight_decay=1e-2),
    "sgd-dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8, dampening=0.3),
    "sgd-groups": lambda m: torch.optim.SGD([
        {"params": [p for n, p in m.named_parameters() if n.startswith("fc")], "lr": 0.3, "weight_decay": 0.0},
        {"params": [p for n, p in m.named_parameters() if not n.startswith("fc")]},
    ], lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-2),
    "timm-sgd": lambda m: timm.optim.create_optimizer_v2(m, opt="sgd", lr=0.1, weight_decay=1e-2, momentum=0.9),
    "timm-momentum": lambda m: timm.optim.create_optimizer_v2(m, opt="momentum", lr=0.1, weight_decay=1e-2,
                                                              momentum=0.9),
    "timm-sgdw": lambda m: timm.optim.create_optimizer_v2(m, opt="sgdw", lr=0.1, weight_decay=1e-1, momentum=0.9),
}


@pytest.mark.parametrize("steps_before", [0, 1], ids=["first-step", "with-momentum-state"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_virtual_step_is_the_real_optimizer_step(name, steps_before):
    model = tiny()
    opt = OPTIMIZERS[name](model)
    for k in range(steps_before):  # build up momentum state
        for p, g in zip(model.parameters(), grads_at(model, 100 + k)):
            p.grad = g
        opt.step()
    params = dict(model.named_parameters())
    steps, buffers = virtual_step_from_optimizer(opt, params)
    if steps_before and opt.param_groups[0].get("momentum"):
        assert set(buffers) == set(params)
    grads = dict(zip(params, grads_at(model, 7)))
    expected = {n: steps[n].apply(p.detach(), grads[n], buffers.get(n)) for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads[n]
    opt.step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14, msg=n)


def test_timm_groups_are_read_biases_and_norms_without_weight_decay():
    model = tiny()
    steps, _ = virtual_step_from_optimizer(
        timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=1e-3, momentum=0.9),
        dict(model.named_parameters()))
    assert all(s.nesterov and s.momentum == 0.9 for s in steps.values())
    for n, p in model.named_parameters():
        assert steps[n].weight_decay == (0.0 if p.ndim <= 1 else 1e-3), n


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    lambda m: timm.optim.create_optimizer_v2(m, opt="adamw", lr=1e-3),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, maximize=True),
    lambda m: timm.optim.create_optimizer_v2(m, opt="sgdw", lr=0.1, momentum=0.9, caution=True),
], ids=["adam", "timm-adamw", "sgd-maximize", "sgdw-caution"])
def test_an_optimizer_it_cannot_mirror_is_a_one_line_user_error(make):
    model = tiny()
    with pytest.raises(UserError) as err:
        virtual_step_from_optimizer(make(model), dict(model.named_parameters()))
    assert "mirror" in str(err.value) and "\n" not in str(err.value)


def test_mirrored_meta_gradient_equals_finite_differences():
    """Per-group lr/weight decay, Nesterov and momentum state: the exact meta-gradient of the mirrored step."""
    model = tiny()
    opt = OPTIMIZERS["sgd-groups"](model)
    for p, g in zip(model.parameters(), grads_at(model, 3)):
        p.grad = g
    opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    steps, buffers = virtual_step_from_optimizer(opt, dict(model.named_parameters()))
    torch.manual_seed(1)
    wnet = CMWNet(hidden_size=6, num_heads=2).double()
    batch = TrainBatch(torch.randn(10, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (10,)),
                       torch.tensor([0, 1, 1, 0]))
    xm, ym = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    objective = WeightedCE()
    bufs = dict(model.named_buffers())
    result = meta_gradient(model, wnet, dict(model.named_parameters()), bufs, batch, xm, ym, objective, steps,
                           virtual_names(model, "exact"), momentum_buffers=buffers)
    ours = torch.cat([g.flatten() for g in result.wnet_grads.values()])

    def meta_loss(theta):
        wp, i = {}, 0
        for k, p in wnet.named_parameters():
            wp[k] = theta[i:i + p.numel()].view_as(p)
            i += p.numel()
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        terms = objective.terms(functional_call(model, (leaves, {k: b.clone() for k, b in bufs.items()}),
                                                (batch.x,)), batch)
        coeff = objective.coefficients(lambda loss, fam: functional_call(wnet, wp, (loss, fam)), terms, batch)
        grads = torch.autograd.grad((coeff * terms).sum(), list(leaves.values()))
        fast = {k: steps[k].apply(params[k], g, buffers.get(k)) for k, g in zip(leaves, grads)}
        logits = functional_call(model, (fast, {k: b.clone() for k, b in bufs.items()}), (xm,))
        return F.cross_entropy(logits, ym).item()

    theta = torch.cat([p.detach().flatten() for p in wnet.parameters()])
    fd = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = 1e-6
        fd[i] = (meta_loss(theta + e) - meta_loss(theta - e)) / 2e-6
    torch.testing.assert_close(ours, fd, rtol=1e-5, atol=1e-8)


def test_metatrain_runs_with_the_mirrored_step(tmp_path):
    from cmw_transfer.trainer.config import MetaTrainConfig
    from tests.helpers import launch

    cfg = MetaTrainConfig(src="digits-pmd", out=str(tmp_path / "run"), epochs=2, warmup_epochs=1, batch_size=64,
                          meta_set="clean:5", meta_batch_size=50, device="cpu", seed=0, mirror_optimizer=True)
    final = launch(cfg).run()["final"]
    assert final["meta_steps"] > 0 and final["meta_loss"] is not None and final["meta_loss"] == final["meta_loss"]

"""The meta-gradient against its definition: finite differences and the textbook deep-copy implementation."""

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.models import create_model
from cmw_transfer.trainer.config import parse_meta_grad
from cmw_transfer.trainer.meta.metastep import (
    FamusGates,
    VirtualStep,
    meta_gradient,
    virtual_names,
)
from cmw_transfer.trainer.meta.objectives import SoftLabelCE, TrainBatch, WeightedCE
from tests.reference import naive_meta_gradient


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = create_model("small_cnn", 4, in_chans=1).double()
    wnet = CMWNet(hidden_size=8, num_heads=3).double()
    batch = TrainBatch(torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (12,)),
                       torch.tensor([0, 1, 2, 1]))
    meta = (torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))
    return model, wnet, batch, meta


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def meta_loss_at(model, wnet, theta, batch, meta, objective, step):
    """L_meta(theta) evaluated directly: virtual step at w, CE of the meta batch at w_hat."""
    wp, i = {}, 0
    for k, p in wnet.named_parameters():
        wp[k] = theta[i:i + p.numel()].view_as(p)
        i += p.numel()
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    terms = objective.terms(functional_call(model, (params, bufs), (batch.x,)), batch)
    coeff = objective.coefficients(lambda loss, fam: functional_call(wnet, wp, (loss, fam)), terms.detach(), batch)
    grads = torch.autograd.grad((coeff * terms).sum(), list(params.values()))
    fast = {k: step.apply(p.detach(), g, None) for (k, p), g in zip(params.items(), grads)}
    logits = functional_call(model, (fast, {k: b.clone() for k, b in model.named_buffers()}), (meta[0],))
    return F.cross_entropy(logits, meta[1]).item()


@pytest.mark.parametrize(("step", "normalization"), [
    (VirtualStep(0.5), "batch"),
    (VirtualStep(0.3, momentum=0.9, weight_decay=1e-3, nesterov=True), "sum"),
])
def test_exact_equals_finite_differences(setup, step, normalization):
    model, wnet, batch, meta = setup
    objective = WeightedCE(normalization)
    result = meta_gradient(model, wnet, dict(model.named_parameters()), dict(model.named_buffers()), batch,
                           *meta, objective, step, virtual_names(model, "exact"))
    theta = torch.cat([p.detach().flatten() for p in wnet.parameters()])
    eps, fd = 1e-6, torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        fd[i] = (meta_loss_at(model, wnet, theta + e, batch, meta, objective, step)
                 - meta_loss_at(model, wnet, theta - e, batch, meta, objective, step)) / (2 * eps)
    torch.testing.assert_close(flat(result.wnet_grads), fd, rtol=1e-5, atol=1e-8)


def test_exact_equals_naive_reference(setup):
    model, wnet, batch, meta = setup
    for objective, b in [(WeightedCE(), batch),
                         (SoftLabelCE(), TrainBatch(batch.x, batch.y, batch.family_of_class,
                                                    pseudo=torch.softmax(torch.randn(12, 4, dtype=torch.float64), 1),
                                                    lam=0.7, perm=torch.randperm(12)))]:
        ours = meta_gradient(model, wnet, dict(model.named_parameters()), dict(model.named_buffers()), b, *meta,
                             objective, VirtualStep(0.4), virtual_names(model, "exact"))
        ref = naive_meta_gradient(model, wnet, b, *meta, objective, 0.4)
        torch.testing.assert_close(flat(ours.wnet_grads), flat(ref), rtol=1e-9, atol=1e-12)


def test_meta_step_leaves_model_and_bn_buffers_untouched(setup):
    model, wnet, batch, meta = setup
    before = copy.deepcopy(model.state_dict())
    model.train()
    meta_gradient(model, wnet, dict(model.named_parameters()), dict(model.named_buffers()), batch, *meta,
                  WeightedCE(), VirtualStep(0.5), virtual_names(model, "exact"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_k1_is_mwnet(setup):
    """A K=1 CMW-Net is MW-Net's VNet(1, H, 1): same function, same meta-gradient."""
    model, _, batch, meta = setup
    torch.manual_seed(1)
    cmw = CMWNet(hidden_size=8, num_heads=1).double()
    vnet = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid()).double()
    with torch.no_grad():
        vnet[0].weight.copy_(cmw.trunk.weight)
        vnet[0].bias.copy_(cmw.trunk.bias)
        vnet[2].weight.copy_(cmw.heads.weight)
        vnet[2].bias.copy_(cmw.heads.bias)

    class VNet(nn.Module):  # MW-Net's interface: loss only
        def __init__(self):
            super().__init__()
            self.v = vnet

        def forward(self, loss, family=None):
            return self.v(loss.reshape(-1, 1)).reshape(-1)

    losses = torch.linspace(0, 6, 13, dtype=torch.float64)
    torch.testing.assert_close(cmw(losses), VNet()(losses))
    b = TrainBatch(batch.x, batch.y, torch.zeros(4, dtype=torch.long))
    g_cmw = naive_meta_gradient(model, cmw, b, *meta, WeightedCE(), 0.5)
    g_mw = naive_meta_gradient(model, VNet(), b, *meta, WeightedCE(), 0.5)
    torch.testing.assert_close(flat(g_cmw), flat(g_mw))


def test_skip_and_famus_close_to_exact(setup):
    model, wnet, batch, meta = setup
    params, bufs = dict(model.named_parameters()), dict(model.named_buffers())
    exact = flat(meta_gradient(model, wnet, params, bufs, batch, *meta, WeightedCE(), VirtualStep(0.5),
                               virtual_names(model, "exact")).wnet_grads)
    names = virtual_names(model, "skip", 2)
    assert names == ["layer2.0.weight", "layer2.0.bias", "layer2.1.weight", "layer2.1.bias", "fc.weight", "fc.bias"]
    skip = flat(meta_gradient(model, wnet, params, bufs, batch, *meta, WeightedCE(), VirtualStep(0.5),
                              names).wnet_grads)
    assert torch.cosine_similarity(exact, skip, 0) > 0.9
    assert not torch.allclose(exact, skip)  # it is an approximation, not the same computation
    gates = FamusGates({n: params[n].shape for n in names}, always_on=["fc.weight", "fc.bias"]).double()
    famus = meta_gradient(model, wnet, params, bufs, batch, *meta, WeightedCE(), VirtualStep(0.5), names,
                          gates=gates)
    assert {"fc.weight", "fc.bias"} <= set(famus.active)
    assert famus.gate_grads and all(torch.isfinite(g).all() for g in famus.gate_grads.values() if g is not None)


def test_skip_everything_but_head_only_touches_head(setup):
    model = setup[0]
    names = virtual_names(model, "skip", 3)
    assert names == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError):
        virtual_names(model, "skip", 4)


def test_parse_meta_grad():
    assert parse_meta_grad("exact") == ("exact", 0)
    assert parse_meta_grad("skip:2") == ("skip", 2)
    assert parse_meta_grad("famus") == ("famus", 0)
    for bad in ("skip", "skip:x", "fast"):
        with pytest.raises(ValueError):
            parse_meta_grad(bad)


def test_forward_and_reverse_derivatives_agree_and_train_grads_are_the_weighted_gradient(setup):
    model, wnet, batch, meta = setup
    params, bufs = dict(model.named_parameters()), dict(model.named_buffers())
    names = virtual_names(model, "exact")
    results = {}
    for how in ("forward", "reverse"):
        logits = model(batch.x)
        terms = WeightedCE().terms(logits, batch)
        results[how] = meta_gradient(model, wnet, params, bufs, batch, *meta, WeightedCE(), VirtualStep(0.5),
                                     names, train_out=(logits, terms), derivatives=how)
    torch.testing.assert_close(flat(results["forward"].wnet_grads), flat(results["reverse"].wnet_grads))
    model.zero_grad()
    logits = model(batch.x)
    terms = WeightedCE().terms(logits, batch)
    with torch.no_grad():
        coeff = WeightedCE().coefficients(wnet, terms, batch)
    (coeff * terms).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(results["forward"].train_grads[name], p.grad)

"""``--meta-grad exact`` against the authors' literal MW-Net / CMW-Net step (``tests/reference_official.py``).

Float64, the paper's option-A ResNet-32 on small inputs, K=1 (MW-Net's VNet) and K=3 with a per-class head map.
"""

import copy

import pytest
import torch

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.models import create_model
from cmw_transfer.trainer.meta.metastep import VirtualStep, meta_gradient, virtual_names
from cmw_transfer.trainer.meta.objectives import SoftLabelCE, TrainBatch, WeightedCE
from tests.reference_official import (
    SoftLabels,
    authors_grads_as_cmwnet,
    authors_net_like,
    official_iteration,
    official_meta_step,
)

CLASSES = 4
FAMILY = {1: [0, 0, 0, 0], 3: [2, 0, 1, 0]}  # class -> head (the authors' list ``c``)


def build():
    return create_model("cifar_resnet32", CLASSES, in_chans=3).double()


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    model = build().train()
    with torch.no_grad():  # non-trivial BN affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    xm = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    ym = torch.tensor([3, 2, 1, 0, 1, 2])
    pseudo = torch.softmax(torch.randn(8, CLASSES, dtype=torch.float64), 1)
    return model, x, y, xm, ym, SoftLabels(pseudo, 0.7, torch.tensor([3, 0, 5, 1, 7, 2, 4, 6]))


def toolkit_batch(x, y, heads, soft):
    fam = torch.tensor(FAMILY[heads])
    if soft is None:
        return TrainBatch(x, y, fam), WeightedCE("batch")
    return TrainBatch(x, y, fam, pseudo=soft.pseudo, lam=soft.lam, perm=soft.idx), SoftLabelCE()


def wnet(heads):
    torch.manual_seed(heads)
    net = CMWNet(hidden_size=16, num_heads=heads).double()
    with torch.no_grad():  # heads that actually differ and weights away from saturation
        net.heads.weight.mul_(3.0)
    return net


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("sl", [False, True], ids=["mwnet-loss", "cmwnet-sl-loss"])
def test_exact_meta_gradient_equals_the_authors_step(state, heads, sl):
    model, x, y, xm, ym, soft = state
    soft = soft if sl else None
    before = copy.deepcopy(model.state_dict())
    net = wnet(heads)
    authors = authors_net_like(net)
    official_meta_step(build, model, authors, x, y, FAMILY[heads], xm, ym, 0.3, soft)
    expected = authors_grads_as_cmwnet(authors)

    batch, objective = toolkit_batch(x, y, heads, soft)
    ours = meta_gradient(model, net, dict(model.named_parameters()), dict(model.named_buffers()), batch, xm, ym,
                         objective, VirtualStep(0.3), virtual_names(model, "exact"))
    for name, g in ours.wnet_grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-6, atol=1e-9, msg=name)
    assert any(float(g.abs().max()) > 1e-6 for g in expected.values())  # not a vacuous zero == zero
    for k, v in model.state_dict().items():  # neither touched the real model (nor its BN statistics)
        assert torch.equal(v, before[k]), k


def toolkit_iteration(model, net, opt, wopt, batch, objective, xm, ym, order):
    """What the meta-train loop does per meta iteration: shared forward, exact meta-gradient, net step, real step."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    logits = model(batch.x)
    terms = objective.terms(logits, batch)
    res = meta_gradient(model, net, params, buffers, batch, xm, ym, objective,
                        VirtualStep(opt.param_groups[0]["lr"]), virtual_names(model, "exact"),
                        train_out=(logits, terms), keep_graph=order == "updated")
    for n, p in net.named_parameters():
        p.grad = res.wnet_grads[n]
    wopt.step()
    opt.zero_grad(set_to_none=True)
    if order == "updated":
        with torch.no_grad():
            coeff = objective.coefficients(net, terms.detach(), batch)
        (coeff * terms).sum().backward()
    else:
        for n, p in params.items():
            p.grad = res.train_grads[n]
    opt.step()


def run_both(state, heads, sl, order, wnet_lr=1e-2):
    model0, x, y, xm, ym, soft = state
    soft = soft if sl else None
    ours_model, theirs_model = copy.deepcopy(model0), copy.deepcopy(model0)
    net = wnet(heads)
    authors = authors_net_like(net)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)
            for m in (ours_model, theirs_model)]
    wopts = [torch.optim.Adam(n.parameters(), lr=wnet_lr, weight_decay=1e-4) for n in (net, authors)]
    batch, objective = toolkit_batch(x, y, heads, soft)
    toolkit_iteration(ours_model, net, opts[0], wopts[0], batch, objective, xm, ym, order)
    official_iteration(build, theirs_model, authors, opts[1], wopts[1], x, y, FAMILY[heads], xm, ym, soft)
    return model0, ours_model, theirs_model, net, authors


@pytest.mark.parametrize(("heads", "sl"), [(1, False), (3, True)])
def test_full_iteration_in_the_papers_order_equals_the_authors(state, heads, sl):
    """Actual step after the net update (``--actual-step updated``): same classifier, BN statistics and net."""
    _, ours, theirs, net, authors = run_both(state, heads, sl, "updated")
    theirs_state = theirs.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs_state[k], rtol=1e-9, atol=1e-12, msg=k)
    expected = authors_net_like(net)
    for a, b in zip(expected.parameters(), authors.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_reuse_order_differs_only_by_the_net_update(state):
    """``reuse`` (default) steps with the weights of the net before its update: a small, non-zero difference."""
    model0, ours, theirs, _, _ = run_both(state, 3, True, "reuse")
    p0 = dict(model0.named_parameters())
    th = dict(theirs.named_parameters())
    delta_ours = torch.cat([(p - p0[n]).flatten() for n, p in ours.named_parameters()])
    delta_theirs = torch.cat([(th[n] - p0[n]).flatten() for n in p0])
    rel = float((delta_ours - delta_theirs).detach().norm() / delta_theirs.detach().norm())
    assert 0 < rel < 0.05
    for name, b in ours.named_buffers():  # BN statistics: one update from the same training forward in both
        torch.testing.assert_close(b, dict(theirs.named_buffers())[name])

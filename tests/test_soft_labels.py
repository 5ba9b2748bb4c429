"""CMW-Net-SL pieces: the loss against a per-sample reference, mixup, the pseudo-label bank, the EMA teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cmw_transfer.weighting.soft_labels import (
    PseudoLabelBank,
    SoftLabelCMWLoss,
    make_teacher,
    mix_inputs,
    mixup_losses,
    mixup_weights,
    sample_mixup,
    soft_cross_entropy,
    soft_label_loss,
    teacher_probs,
)


def _reference(logits, y, pseudo, v_a, v_b, lam, perm):
    """The authors' formula written out sample by sample."""
    total = 0.0
    for i in range(logits.shape[0]):
        logp = F.log_softmax(logits[i], dim=0)
        b = int(perm[i])
        ce_a, ce_b = -logp[y[i]], -logp[y[b]]
        sce_a, sce_b = -(pseudo[i] * logp).sum(), -(pseudo[b] * logp).sum()
        total += lam * (ce_a * v_a[i] + sce_a * (1 - v_a[i])) + (1 - lam) * (ce_b * v_b[i] + sce_b * (1 - v_b[i]))
    return total / logits.shape[0]


def _batch(b=6, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=gen)
    y = torch.randint(0, c, (b,), generator=gen)
    pseudo = torch.softmax(torch.randn(b, c, generator=gen), dim=1)
    v_a, v_b = torch.rand(b, generator=gen), torch.rand(b, generator=gen)
    perm = torch.randperm(b, generator=gen)
    return logits, y, pseudo, v_a, v_b, perm


def test_soft_label_loss_matches_per_sample_reference():
    logits, y, pseudo, v_a, v_b, perm = _batch()
    got = soft_label_loss(logits, y, pseudo, (v_a, v_b), 0.7, perm)
    assert torch.allclose(got, _reference(logits, y, pseudo, v_a, v_b, 0.7, perm), atol=1e-6)


def test_weights_one_is_mixup_ce_and_zero_is_pseudo_label_ce():
    logits, y, pseudo, _, _, perm = _batch(seed=1)
    ones, zeros = torch.ones(6), torch.zeros(6)
    lam = 0.8
    mix_ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert torch.allclose(soft_label_loss(logits, y, pseudo, (ones, ones), lam, perm), mix_ce, atol=1e-6)
    mix_sce = (lam * soft_cross_entropy(logits, pseudo) + (1 - lam) * soft_cross_entropy(logits, pseudo[perm])).mean()
    assert torch.allclose(soft_label_loss(logits, y, pseudo, (zeros, zeros), lam, perm), mix_sce, atol=1e-6)


def test_gradient_reaches_weights_when_kept_in_graph():
    """The meta-train stage keeps v in the graph: d loss / d v_a = lam * (CE_a - SCE_a) / B."""
    logits, y, pseudo, v_a, v_b, perm = _batch(seed=2)
    v_a = v_a.clone().requires_grad_(True)
    soft_label_loss(logits, y, pseudo, (v_a, v_b), 0.6, perm).backward()
    expected = 0.6 * (F.cross_entropy(logits, y, reduction="none") - soft_cross_entropy(logits, pseudo)) / 6
    assert torch.allclose(v_a.grad, expected, atol=1e-6)


def test_partner_weight_sees_the_loss_the_partner_term_pays():
    """v_b must come from CE(z_i, y[perm][i]), not CE(z[perm][i], y[perm][i]) (a bug of the authors' code)."""
    logits, y, _, _, _, perm = _batch(seed=3)
    v_a, v_b = mixup_weights(lambda losses, labels: losses, logits, y, perm)
    assert torch.allclose(v_a, F.cross_entropy(logits, y, reduction="none"))
    assert torch.allclose(v_b, F.cross_entropy(logits, y[perm], reduction="none"))
    labels, losses = mixup_losses(logits, y, perm)
    assert torch.equal(labels, torch.cat([y, y[perm]])) and not losses.requires_grad


def test_sample_mixup_keeps_the_larger_share_and_is_reproducible():
    lams = [sample_mixup(8, 1.0, np.random.default_rng(s))[0] for s in range(50)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0 and len(set(lams)) > 10
    a, b = sample_mixup(8, 0.2, np.random.default_rng(7)), sample_mixup(8, 0.2, np.random.default_rng(7))
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and sorted(a[1].tolist()) == list(range(8))
    assert sample_mixup(8, 0.0, np.random.default_rng(0))[0] == 1.0
    x = torch.arange(8.0).reshape(8, 1)
    perm = torch.arange(7, -1, -1)
    assert torch.allclose(mix_inputs(x, 0.75, perm), 0.75 * x + 0.25 * x[perm])


def test_pseudo_label_bank_starts_one_hot_and_follows_the_teacher():
    bank = PseudoLabelBank(np.array([0, 2, 1]), 3, momentum=0.9)
    assert torch.equal(bank.probs, torch.eye(3)[[0, 2, 1]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    rows = bank.update(torch.tensor([0]), q)
    assert torch.allclose(rows, torch.tensor([[0.9, 0.1, 0.0]]))
    assert torch.allclose(bank[torch.tensor([0, 1])], torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]))
    state = bank.state_dict()
    other = PseudoLabelBank(np.array([1, 1, 1]), 3)
    other.load_state_dict(state)
    assert torch.equal(other.probs, bank.probs)
    with pytest.raises(ValueError, match="shape"):
        PseudoLabelBank(np.array([0, 1]), 3).load_state_dict(state)


def test_teacher_is_an_ema_of_parameters_with_copied_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(model, decay=0.9)
    before = teacher.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    teacher.update(model)
    assert torch.allclose(teacher.module[0].weight, before + 0.1)
    assert torch.equal(teacher.module[1].running_mean, torch.full((2,), 5.0))
    probs = teacher_probs(teacher, torch.randn(4, 2))
    assert torch.allclose(probs.sum(1), torch.ones(4)) and not teacher.module.training


def test_soft_label_criterion_without_net_is_plain_mixup_ce():
    crit = SoftLabelCMWLoss(None, alpha=1.0, seed=0)
    x = torch.randn(6, 3)
    x_mixed, lam, perm = crit.mix(x)
    assert 0.5 <= lam <= 1.0 and x_mixed.shape == x.shape
    logits, y, pseudo, *_ = _batch(seed=4)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert math.isclose(float(crit(logits, y, pseudo, lam, perm)), float(expected), rel_tol=1e-6)

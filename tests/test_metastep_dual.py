"""The fused dual forward (``FusedTangents``) against ``torch.func.jvp``, in float64, on several architectures."""

import pytest
import torch
from torch import nn

from cmw_transfer.models import create_model
from cmw_transfer.trainer.meta.metastep import forward_directional_derivatives, virtual_names
from cmw_transfer.trainer.meta.objectives import SoftLabelCE, TrainBatch, WeightedCE


def case(name, train=True, classes=4):
    torch.manual_seed(0)
    model = create_model(name, classes, in_chans=3).double().train(train)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, classes, (6,))
    return model, TrainBatch(x, y, torch.zeros(classes, dtype=torch.long))


def both(model, batch, names, objective=None):
    objective = objective or WeightedCE()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    torch.manual_seed(1)
    tangents = [torch.randn_like(params[n]) for n in names]
    fused = forward_directional_derivatives(model, params, buffers, batch, objective, names, tangents)
    ref = forward_directional_derivatives(model, params, buffers, batch, objective, names, tangents, fused=False)
    return fused, ref


@pytest.mark.parametrize("name", ["cifar_resnet32", "cifar_resnet32b", "small_cnn", "resnet18",
                                  "mobilenetv3_small_050"])
@pytest.mark.parametrize("train", [True, False], ids=["bn-train", "bn-eval"])
def test_fused_dual_forward_equals_jvp(name, train):
    model, batch = case(name, train)
    fused, ref = both(model, batch, virtual_names(model, "exact"))
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)


def test_fused_with_partial_tangents_and_soft_labels():
    """Bottom stages frozen (convs without input tangent, BN without parameter tangent); the SL objective."""
    model, batch = case("cifar_resnet32")
    pseudo = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    sl = TrainBatch(batch.x, batch.y, batch.family_of_class, pseudo=pseudo, lam=0.6, perm=torch.randperm(6))
    names = [n for n in virtual_names(model, "skip", 2) if not n.endswith("bn1.weight")]
    fused, ref = both(model, sl, names, SoftLabelCE())
    assert fused.shape == (6, 4)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)


def test_fused_leaves_bn_buffers_untouched():
    model, batch = case("cifar_resnet32")
    before = {k: b.clone() for k, b in model.named_buffers()}
    both(model, batch, virtual_names(model, "exact"))
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k

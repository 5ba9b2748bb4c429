"""The built-in models: the paper's option-A ResNet-32, the option-B variant and the LeNet-style CNN."""

import pytest
import torch

from cmw_transfer.models import create_model, list_builtin_models, parameter_stages
from cmw_transfer.models.builtin import PadShortcut


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_cifar_resnet32_is_option_a_with_the_papers_parameter_count():
    model = create_model("cifar_resnet32", 10)
    # He et al. 2016, Table 6: ResNet-32 has 0.46M parameters (conv + BN + fc, no projection shortcuts)
    assert n_params(model) == 464_154
    shortcuts = [m.shortcut for m in model.modules() if hasattr(m, "shortcut")]
    assert sum(isinstance(s, PadShortcut) for s in shortcuts) == 2  # the two stage transitions
    assert all(not list(s.parameters()) for s in shortcuts)


def test_option_b_variant_is_registered_and_has_projections():
    assert {"cifar_resnet32", "cifar_resnet32b", "cifar_resnet20", "cifar_resnet20b"} <= set(list_builtin_models())
    b = create_model("cifar_resnet32b", 10)
    # two 1x1 projections (16->32, 32->64) with their BN: 512 + 64 + 2048 + 128 more parameters
    assert n_params(b) == 464_154 + 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert n_params(create_model("cifar_resnet20", 10)) == 269_722


def test_pad_shortcut_subsamples_and_zero_pads_channels_evenly():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", ["cifar_resnet32", "cifar_resnet32b"])
def test_forward_shape_gradients_and_stages(name):
    model = create_model(name, 7, in_chans=1)
    out = model(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    stages = parameter_stages(model)
    assert len(stages) == 5  # stem, layer1-3, classifier
    assert stages[-1] == ["fc.weight", "fc.bias"]


def test_bad_shortcut_is_refused():
    from cmw_transfer.models.builtin import CifarResNet
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(32, shortcut="C")


def test_lenet_has_the_documented_shape_and_timm_interface():
    model = create_model("lenet", 10, in_chans=1, input_size=(28, 28))
    # conv 1->16 (3x3, no bias) + BN, conv 16->32 + BN, fc 1568->128, fc 128->10
    assert n_params(model) == 144 + 32 + 4608 + 64 + 1568 * 128 + 128 + 1290
    x = torch.randn(3, 1, 28, 28)
    fmap = model.forward_features(x)
    assert fmap.shape == (3, 32, 7, 7)
    hidden = model.forward_head(fmap, pre_logits=True)
    assert hidden.shape == (3, model.num_features) and (hidden >= 0).all()
    torch.testing.assert_close(model.get_classifier()(hidden), model(x))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # other sizes are pooled to 7x7 in the head
    assert [len(s) for s in parameter_stages(model)] == [3, 3, 2, 2]  # stem, conv block, hidden layer, classifier
    assert parameter_stages(model)[-1] == ["fc.weight", "fc.bias"]


def test_lenet_exact_meta_gradient_equals_the_naive_reference():
    """The fused dual forward (conv, BN) and PyTorch's own rules (max-pool, linear) give the textbook meta-gradient;
    SLMO's skip keeps the top stages only."""
    from cmw_transfer.artifact.net import CMWNet
    from cmw_transfer.trainer.meta.metastep import VirtualStep, meta_gradient, virtual_names
    from cmw_transfer.trainer.meta.objectives import TrainBatch, WeightedCE
    from tests.reference import naive_meta_gradient

    torch.manual_seed(0)
    model = create_model("lenet", 4, in_chans=1).double()
    wnet = CMWNet(hidden_size=8, num_heads=3).double()
    batch = TrainBatch(torch.randn(10, 1, 28, 28, dtype=torch.float64), torch.randint(0, 4, (10,)),
                       torch.tensor([0, 1, 2, 1]))
    meta = (torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 4, (6,)))
    ours = meta_gradient(model, wnet, dict(model.named_parameters()), dict(model.named_buffers()), batch, *meta,
                         WeightedCE(), VirtualStep(0.4), virtual_names(model, "exact"))
    ref = naive_meta_gradient(model, wnet, batch, *meta, WeightedCE(), 0.4)
    flat = [torch.cat([g.flatten() for g in grads.values()]) for grads in (ours.wnet_grads, ref)]
    torch.testing.assert_close(flat[0], flat[1], rtol=1e-9, atol=1e-12)
    assert virtual_names(model, "skip", 2) == ["fc1.weight", "fc1.bias", "fc.weight", "fc.bias"]

"""The built-in CIFAR ResNets: the paper's option-A ResNet-32 and the option-B variant."""

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

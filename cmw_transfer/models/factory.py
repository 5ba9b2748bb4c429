"""``create_model``: the built-ins by name, anything else through timm.

Built-ins: ``cifar_resnet32`` / ``cifar_resnet20`` are the papers' CIFAR ResNets with option-A (parameter-free,
zero-padded) shortcuts, the MW-Net / CMW-Net backbone (ResNet-32: 0.46M parameters); ``cifar_resnet32b`` /
``cifar_resnet20b`` are the option-B variants (1x1 conv + BN projection shortcuts); ``small_cnn`` is the digits CNN.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
from timm.models import group_parameters
from torch import nn

from cmw_transfer.errors import UserError
from cmw_transfer.models.builtin import CifarResNet, SmallCNN

# cifar_resnet32/20: the papers' option-A ResNets (parameter-free zero-padded shortcuts; ResNet-32 = 0.46M
# parameters, as MW-Net / CMW-Net); cifar_resnet32b/20b: the option-B variants (1x1 conv + BN projections).
BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet32": lambda num_classes, in_chans: CifarResNet(32, num_classes, in_chans),
    "cifar_resnet20": lambda num_classes, in_chans: CifarResNet(20, num_classes, in_chans),
    "cifar_resnet32b": lambda num_classes, in_chans: CifarResNet(32, num_classes, in_chans, shortcut="B"),
    "cifar_resnet20b": lambda num_classes, in_chans: CifarResNet(20, num_classes, in_chans, shortcut="B"),
    "small_cnn": lambda num_classes, in_chans: SmallCNN(num_classes, in_chans),
}


def create_model(name: str, num_classes: int, in_chans: int = 3, **timm_kwargs) -> nn.Module:
    """A classifier with ``num_classes`` outputs; unknown names are a user error that suggests near matches."""
    key = name.replace("-", "_")
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key](num_classes=num_classes, in_chans=in_chans)
    if not timm.is_model(name):
        stem = name.split("_")[0][:6]
        near = timm.list_models(f"*{stem}*")[:8] if stem else []
        hint = f"; similar timm models: {', '.join(near)}" if near else ""
        raise UserError(f"unknown model '{name}': not a built-in ({', '.join(sorted(BUILTIN_MODELS))}) nor a timm "
                        f"model name{hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)


def list_builtin_models() -> list[str]:
    return sorted(BUILTIN_MODELS)


def parameter_stages(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by stage, bottom (stem) to top (classifier), via timm's group matchers."""
    if not hasattr(model, "group_matcher"):
        return [[name] for name, _ in model.named_parameters()]
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(groups.items())]

"""``create_model``: the built-ins by name, anything else through timm (``hf-hub:`` names, pretrained weights and
an initial checkpoint as in timm's ``train.py``).

Built-ins: ``cifar_resnet32`` / ``cifar_resnet20`` are the papers' CIFAR ResNets with option-A (parameter-free,
zero-padded) shortcuts, the MW-Net / CMW-Net backbone (ResNet-32: 0.46M parameters); ``cifar_resnet32b`` /
``cifar_resnet20b`` are the option-B variants (1x1 conv + BN projection shortcuts); ``small_cnn`` is the digits CNN;
``lenet`` the LeNet-style CNN for 28x28 grey images (Fashion-MNIST's default).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from timm.models import group_parameters
from torch import nn

from cmw_transfer.errors import UserError
from cmw_transfer.models.builtin import CifarResNet, LeNet, SmallCNN
from cmw_transfer.models.geometry import check_geometry
from cmw_transfer.untrusted import quiet_warnings, read_safetensors

# cifar_resnet32/20: the papers' option-A ResNets (parameter-free zero-padded shortcuts; ResNet-32 = 0.46M
# parameters, as MW-Net / CMW-Net); cifar_resnet32b/20b: the option-B variants (1x1 conv + BN projections).
BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet32": lambda num_classes, in_chans: CifarResNet(32, num_classes, in_chans),
    "cifar_resnet20": lambda num_classes, in_chans: CifarResNet(20, num_classes, in_chans),
    "cifar_resnet32b": lambda num_classes, in_chans: CifarResNet(32, num_classes, in_chans, shortcut="B"),
    "cifar_resnet20b": lambda num_classes, in_chans: CifarResNet(20, num_classes, in_chans, shortcut="B"),
    "small_cnn": lambda num_classes, in_chans: SmallCNN(num_classes, in_chans),
    "lenet": lambda num_classes, in_chans: LeNet(num_classes, in_chans),
}
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def similar_models(name: str, limit: int = 8) -> list[str]:
    """Near matches among the built-ins and timm's names: ``resnet_18`` -> ``resnet18`` first."""
    key = name.lower()
    squashed = key.replace("_", "").replace("-", "")
    names = [*BUILTIN_MODELS, *timm.list_models()]
    exact = [n for n in names if n.replace("_", "").replace("-", "") == squashed]
    close = difflib.get_close_matches(key, names, n=limit, cutoff=0.6)
    stem = key.split("_")[0][:6]
    pattern = timm.list_models(f"*{stem}*")[:limit] if stem else []
    return list(dict.fromkeys([*exact, *close, *pattern]))[:limit]


def _unknown_model(name: str) -> UserError:
    near = similar_models(name)
    hint = f"; similar: {', '.join(near)}" if near else ""
    return UserError(f"unknown model '{name}': not a built-in ({', '.join(sorted(BUILTIN_MODELS))}), a timm model "
                     f"name nor hf-hub:ORG/NAME{hint}")


def _hub_error(name: str, exc: BaseException) -> UserError:
    repo = name.split(":", 1)[1] if name.startswith(HUB_PREFIXES) else f"timm/{name}"
    return UserError(f"pretrained weights for '{name}' are not in the local Hugging Face cache and the Hub cannot be "
                     f"reached ({exc.__class__.__name__}): download them where there is network (hf download "
                     f"{repo}), point HF_HUB_CACHE at that cache, or drop --pretrained")


def _offline_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from cmw_transfer.weights.hub import _transport_errors

    return (LocalEntryNotFoundError, OfflineModeIsEnabled, *_transport_errors())


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as exc:  # a CNN takes any size: img_size is for the models that need it (ViT, ...)
            if "img_size" not in kwargs or "img_size" not in str(exc):
                raise
            return timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items()
                                                                       if k != "img_size"})
    except _offline_errors() as exc:
        raise _hub_error(name, exc) from None
    except HfHubHTTPError as exc:
        raise UserError(f"pretrained weights for '{name}': the Hub answered {exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise _unknown_model(name) from None
        if pretrained and "size mismatch" in str(exc):
            raise UserError(f"pretrained weights for '{name}' do not fit in_chans / img_size "
                            f"({' '.join(str(exc).split())[:160]})") from None
        raise


def load_initial_checkpoint(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """timm ``--initial-checkpoint``: a state dict (``.safetensors`` or ``torch.save``, loaded weights-only; a
    ``state_dict`` / ``model`` entry of a training checkpoint is picked), loaded strictly.

    A ``.safetensors`` file goes through the bounded reader (:func:`cmw_transfer.untrusted.read_safetensors`),
    as timm would hand it to ``safetensors.torch.load_file``; a pickle is read with torch's warnings dropped (its
    "Detected pickle protocol" line would precede the one error line)."""
    import pickle

    from timm.models import clean_state_dict, load_checkpoint

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--initial-checkpoint {file}: no such file")
    try:
        if file.name.endswith(".safetensors"):
            _, state = read_safetensors(file, label=f"--initial-checkpoint {file}")
            model.load_state_dict(clean_state_dict(state), strict=True)
        else:
            with quiet_warnings():
                load_checkpoint(model, str(file), use_ema=False, strict=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError, OSError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"--initial-checkpoint {file} does not load into '{name}' ({detail}): it must be a state "
                        "dict of this model with the same number of classes and input channels") from None


def create_model(name: str, num_classes: int, in_chans: int = 3, *, pretrained: bool = False,
                 checkpoint_path: str | os.PathLike | None = None, img_size: int | None = None,
                 input_size: tuple[int, int] | None = None, resizable: bool = True, **timm_kwargs: Any) -> nn.Module:
    """A classifier with ``num_classes`` outputs for ``in_chans``-channel inputs.

    ``name``: a built-in, a timm name or ``hf-hub:ORG/NAME``. ``pretrained``: timm's pretrained weights (from the
    Hugging Face cache; offline without them is a one-line UserError). ``checkpoint_path``: an initial checkpoint
    loaded after construction (timm ``--initial-checkpoint``). ``img_size``: the square input size, passed to the
    models that are built for one (ViTs) and checked; ``input_size``: ``(H, W)`` to check without resizing (e.g.
    8 x 8 digits). A model that cannot take the input is a UserError naming the fix (``--img-size`` only where
    the command has it: ``resizable``).
    """
    key = name.replace("-", "_")
    if key in BUILTIN_MODELS:
        if pretrained:
            raise UserError(f"--pretrained: the built-in '{name}' has no pretrained weights; use a timm model name")
        model = BUILTIN_MODELS[key](num_classes=num_classes, in_chans=in_chans)
    else:
        if not name.startswith(HUB_PREFIXES) and not timm.is_model(name):
            raise _unknown_model(name)
        kwargs = {"num_classes": num_classes, "in_chans": in_chans, **timm_kwargs}
        if img_size is not None:
            kwargs["img_size"] = img_size
        model = _timm_model(name, pretrained, kwargs)
    if checkpoint_path:
        load_initial_checkpoint(model, checkpoint_path, name)
    size = (img_size, img_size) if img_size is not None else input_size
    if size is not None:
        check_geometry(model, (in_chans, *size), name, resizable=resizable)
    return model


def list_builtin_models() -> list[str]:
    return sorted(BUILTIN_MODELS)


def parameter_stages(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by stage, bottom (stem) to top (classifier), via timm's group matchers."""
    if not hasattr(model, "group_matcher"):
        return [[name] for name, _ in model.named_parameters()]
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(groups.items())]

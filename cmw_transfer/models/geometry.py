"""Input geometry: the ``(channels, height, width)`` a classifier receives, agreed between model and transform.

The rule: without a resize the model sees the dataset's own tensors (e.g. the embedded digits, 1 x 8 x 8); with
``img_size`` the samples go through a timm transform, which receives an RGB PIL image (grey images are converted,
i.e. the channel is replicated) and emits ``3 x img_size x img_size``, so the model is built for 3 channels.
:func:`data_config` is ``timm.data.resolve_model_data_config(model)`` with that geometry, the configuration
``timm.data.create_transform(**cfg)`` needs; :func:`check_geometry` proves by one dry forward on a zero sample that
the model accepts it, and otherwise says in one line what to change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmw_transfer.errors import UserError

SMALL_INPUT_MODELS = "small_cnn, cifar_resnet20, cifar_resnet32"


def input_geometry(dataset_shape: tuple[int, int, int] | None, img_size: int | None) -> tuple[int, int, int]:
    """``(C, H, W)`` the model will see: the dataset's own shape, or RGB at ``img_size`` when resized."""
    if img_size is not None:
        if img_size < 1:
            raise UserError(f"--img-size must be a positive number of pixels, got {img_size}")
        return (3, int(img_size), int(img_size))
    if dataset_shape is None:
        raise UserError("the input size of this dataset is not fixed (files of any size): give --img-size")
    return tuple(int(v) for v in dataset_shape)  # type: ignore[return-value]


def data_config(model: nn.Module, geometry: tuple[int, int, int]) -> dict[str, Any]:
    """timm's data config for ``model`` (mean, std, interpolation, crop) at the given ``(C, H, W)``."""
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    channels = geometry[0]
    for key in ("mean", "std"):
        values = tuple(cfg[key])
        cfg[key] = values[:channels] if len(values) >= channels else (values * channels)[:channels]
    cfg["input_size"] = tuple(geometry)
    return cfg


def check_geometry(model: nn.Module, geometry: tuple[int, int, int], name: str, *, resizable: bool = True) -> None:
    """One forward of a zero sample in eval mode (no grad); a model that cannot take the input is a UserError
    (``resizable``: the command has ``--img-size``, so the message offers it)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *geometry), device=device))
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        channels, height, width = geometry
        detail = " ".join(str(exc).split())[:160]
        fix = f"resize with --img-size (e.g. --img-size {suggested_size(model)}) or pick" if resizable else "pick"
        raise UserError(
            f"model '{name}' cannot take {channels}x{height}x{width} inputs ({detail}): {fix} a model for small "
            f"images ({SMALL_INPUT_MODELS})"
        ) from None
    finally:
        model.train(was_training)


def suggested_size(model: nn.Module) -> int:
    """The model's own default input size (timm's pretrained config), 224 when unknown."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3, 224, 224)
    return int(size[-1])

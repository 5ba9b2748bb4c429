"""The Hub mixin's persistence for :class:`~cmw_transfer.artifact.net.CMWNet`: save, load, push, model card.

``CMWNet`` declares ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` / ``generate_model_card`` (users
call them on the class, as on any ``PyTorchModelHubMixin`` model); this module serves them and registers itself
with :func:`cmw_transfer.artifact.net.register_backend` on import, so ``net.py`` stays the bottom of the package.

Semantics follow the mixin: ``save_pretrained(dir, config=..., push_to_hub=..., repo_id=...)`` keeps an existing
README.md, ``from_pretrained("org/name")`` is a Hub repo id unless such a local path exists, and ``revision``,
``cache_dir``, ``token``, ``force_download`` and ``local_files_only`` are honoured. ``hub:org/name`` only ever
resolves through the Hugging Face cache, never a local ``./org/name``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from cmw_transfer.artifact import card, curves, fileformat, net
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.atomic import write_json, write_text
from cmw_transfer.errors import UserError
from cmw_transfer.weights.hub import ETAG_TIMEOUT_S, check_can_push, hub_errors_as_user_errors, hub_unreachable
from cmw_transfer.weights.spec import REPO_ID_PATTERN, WeightsSpec, parse_weights_spec, pretrained_path

SHAPE_KEYS = ("hidden_size", "num_heads", "centers", "format_version")


# -- save -----------------------------------------------------------------------------------------------------------
def side_config(model: CMWNet, extra: dict[str, Any] | None) -> dict[str, Any]:
    """config.json: the net's own config plus the caller's extra keys, which may not contradict it."""
    own = model.config()
    if extra is None:
        return own
    if not isinstance(extra, dict):
        raise TypeError(f"config must be a dict, got {type(extra).__name__}")
    clash = sorted(k for k in extra if k in own and extra[k] != own[k])
    if clash:
        raise ValueError(f"config keys {clash} contradict the net's own config; leave them out (they are written "
                         "from the net)")
    return {**extra, **own}


def save_files(model: CMWNet, directory: Path, config: dict[str, Any] | None = None) -> None:
    """The mixin's ``_save_pretrained``: weights (config in the header), config.json and the curves PNG."""
    fileformat.save_net(model, directory / fileformat.WEIGHTS_NAME)
    write_json(directory / fileformat.CONFIG_NAME, config or model.config())
    curves.plot_curves(model, directory / fileformat.CURVES_NAME)


def save_pretrained(model: CMWNet, save_directory: str | os.PathLike, *, config: dict[str, Any] | None = None,
                    repo_id: str | None = None, push_to_hub: bool = False,
                    model_card_kwargs: dict[str, Any] | None = None, **push_to_hub_kwargs: Any) -> str | None:
    directory = Path(save_directory)
    merged = side_config(model, config)
    directory.mkdir(parents=True, exist_ok=True)
    save_files(model, directory, merged)
    readme = directory / fileformat.CARD_NAME
    card_kwargs = dict(model_card_kwargs or {})
    if not readme.exists():  # as the mixin: a card already there (perhaps hand-edited) is kept
        card_kwargs.setdefault("metrics", card.final_metrics(directory))
        write_text(readme, card.as_text(model.generate_model_card(**card_kwargs)))
    if not push_to_hub:
        return None
    if config is not None:
        push_to_hub_kwargs["config"] = config
    return model.push_to_hub(repo_id or directory.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)


def save_safetensors(model: CMWNet, path: Path) -> None:
    fileformat.save_net(model, path)


def generate_model_card(model: CMWNet, **kwargs: Any) -> ModelCard:
    return card.render_model_card(model, **kwargs)


def push_to_hub(model: CMWNet, repo_id: str, *, token: str | None = None, branch: str | None = None,
                allow_patterns: list[str] | str | None = None, **kwargs: Any) -> str:
    """The mixin's ``push_to_hub`` (create the repo, save into a temporary folder, upload it), with the token and
    offline mode checked before any network call and the Hub's failures said in one line."""
    if not REPO_ID_PATTERN.fullmatch(str(repo_id)):
        raise UserError(f"repo_id must look like org/name, got '{repo_id}'")
    check_can_push(repo_id, token)
    with hub_errors_as_user_errors(WeightsSpec("hub", repo_id, branch), action="push to"):
        return ModelHubMixin.push_to_hub(model, repo_id, token=token, branch=branch,
                                         allow_patterns=allow_patterns or list(fileformat.ARTIFACT_FILES), **kwargs)


# -- load -----------------------------------------------------------------------------------------------------------
def _one_revision(spec: WeightsSpec, revision: str | None) -> str | None:
    if spec.revision and revision and spec.revision != revision:
        raise UserError(f"{spec} pins revision '{spec.revision}' but revision='{revision}' was also given")
    return spec.revision or revision


def from_pretrained(cls: type[CMWNet], spec: str | os.PathLike | WeightsSpec, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                    local_files_only: bool = False, token: str | bool | None = None,
                    map_location: str = "cpu", **model_kwargs: Any) -> CMWNet:
    if model_kwargs:  # the mixin would pass them to __init__; here the file defines the net entirely
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {sorted(model_kwargs)}; the net's "
                        "config comes from its file")
    hub = {"cache_dir": cache_dir, "force_download": force_download, "local_files_only": local_files_only,
           "token": token}
    if isinstance(spec, WeightsSpec):
        parsed = spec
    elif isinstance(spec, os.PathLike):  # a path object is always a path
        parsed = WeightsSpec("local", os.fspath(spec))
    else:
        parsed = parse_weights_spec(str(spec))
    if parsed.kind == "hub":
        model = from_hub(cls, parsed.target, revision=_one_revision(parsed, revision), **hub)
    elif parsed.kind == "pretrained":
        model = fileformat.load_net(cls, pretrained_path(parsed.target))
    else:
        path = Path(parsed.target)
        if not path.exists() and not isinstance(spec, os.PathLike) and REPO_ID_PATTERN.fullmatch(parsed.target):
            # a bare repo id, as every PyTorchModelHubMixin class reads it (a local path of that name wins)
            model = from_hub(cls, parsed.target, revision=revision, label=f"{parsed.target} (no such local path; "
                             "as a Hub repo id)", **hub)
        else:
            model = fileformat.load_net(cls, path)
    return model.to(map_location)


def from_hub(cls: type[CMWNet], repo_id: str, *, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None, force_download: bool = False, local_files_only: bool = False,
             token: str | bool | None = None, label: str | None = None, **_: Any) -> CMWNet:
    """The mixin's ``_from_pretrained``: both files through ``hf_hub_download`` (cache, HF_HUB_OFFLINE, revisions);
    the header is validated, and config.json, when the repo has one, must agree with it."""
    spec = WeightsSpec("hub", repo_id, revision)
    unreachable = None if local_files_only else hub_unreachable()  # seconds, not huggingface_hub's ~25 s of retries
    if unreachable and force_download:
        raise UserError(f"{label or spec}: force_download needs the Hub, and the Hub cannot be reached "
                        f"({unreachable})")
    kwargs = {"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir, "force_download": force_download,
              "local_files_only": local_files_only or unreachable is not None, "token": token,
              "etag_timeout": ETAG_TIMEOUT_S}
    with hub_errors_as_user_errors(spec, label=label, unreachable=unreachable):
        weights = Path(hf_hub_download(filename=fileformat.WEIGHTS_NAME, **kwargs))
        try:
            config_path: Path | None = Path(hf_hub_download(filename=fileformat.CONFIG_NAME, **kwargs))
        except (EntryNotFoundError, LocalEntryNotFoundError):  # the header alone is enough
            config_path = None
    model = fileformat.load_net(cls, weights, config_path=config_path)
    model.revision = weights.parent.name if weights.parent.parent.name == "snapshots" else None
    return model


def from_official(path: str | os.PathLike, **kwargs: Any) -> CMWNet:
    """``CMWNet.from_official``: the converter lives above this layer and is imported only when used."""
    from cmw_transfer.artifact.official import from_official as convert

    return convert(path, **kwargs)


net.register_backend(sys.modules[__name__])

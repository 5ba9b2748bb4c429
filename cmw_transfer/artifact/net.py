"""CMW-Net: ``V(loss, class-size family) -> weight in [0, 1]``; K=1 is MW-Net.

A shared trunk ``Linear(1->H) + ReLU`` feeds K heads ``Linear(H->1) + Sigmoid``. The K heads are stored as the
rows of one ``Linear(H->K)`` so that choosing a head per sample is one gather, not a Python loop. Row ``i`` is
the head for the ``i``-th smallest class-size center (see :mod:`cmw_transfer.artifact.scales`).

This module is the bottom of :mod:`cmw_transfer.artifact`: the file format, the model card and the curves import
it, never the reverse. The Hub mixin's persistence methods are declared here (users call them on the class) and
served by :mod:`cmw_transfer.artifact.hub`, which registers itself when the package is imported.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

FORMAT_VERSION = 1


class CMWNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="cmw-transfer",
    tags=["sample-weighting", "noisy-labels", "long-tail", "meta-learning"],
    paper_url="https://arxiv.org/abs/2202.05613",
    license="mit",
):
    """Class-aware meta-weight-net; also a Hub mixin, so save / load / push live here."""

    def __init__(
        self,
        hidden_size: int = 100,
        num_heads: int = 3,
        centers: list[float] | None = None,
        loss_range: dict[str, float] | None = None,
        provenance: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_heads < 1:
            raise ValueError(f"hidden_size and num_heads must be >= 1, got {hidden_size}, {num_heads}")
        if centers is not None and len(centers) != num_heads:
            raise ValueError(f"{len(centers)} centers for {num_heads} heads")
        self.hidden_size = int(hidden_size)
        self.num_heads = int(num_heads)
        self.centers = [float(c) for c in centers] if centers is not None else None
        self.loss_range = dict(loss_range) if loss_range else None
        self.provenance = dict(provenance) if provenance else {}
        self.format_version = int(format_version)
        self.revision: str | None = None  # the Hub commit it was loaded from (None: not from the Hub)
        self.trunk = nn.Linear(1, hidden_size)
        self.heads = nn.Linear(hidden_size, num_heads)

    # -- the function itself -------------------------------------------------------------------------------------
    def forward(self, loss: torch.Tensor, family: torch.Tensor | None = None) -> torch.Tensor:
        """One weight per sample. ``loss``: [B] or [B, 1]; ``family``: [B] head indices (optional when K=1)."""
        loss = loss.reshape(-1, 1).to(self.trunk.weight.dtype)
        hidden = torch.relu(self.trunk(loss))
        if family is None:
            if self.num_heads != 1:
                raise ValueError(f"family is required for a net with {self.num_heads} heads")
            family = torch.zeros(loss.shape[0], dtype=torch.long, device=loss.device)
        family = family.reshape(-1).long()
        logit = (hidden * self.heads.weight[family]).sum(dim=1) + self.heads.bias[family]
        return torch.sigmoid(logit)

    @torch.no_grad()
    def curves(self, losses: np.ndarray | list[float]) -> np.ndarray:
        """Weight of every head over a loss grid, shape [K, len(losses)] (the paper's Fig. 3)."""
        grid = torch.as_tensor(np.asarray(losses, dtype=np.float32), device=self.trunk.weight.device)
        rows = [self(grid, torch.full_like(grid, k, dtype=torch.long)) for k in range(self.num_heads)]
        return torch.stack(rows).cpu().numpy()

    # -- configuration -------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild and to trust the net; stored in config.json and the safetensors header."""
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "centers": self.centers,
            "loss_range": self.loss_range,
            "provenance": self.provenance,
            "format_version": self.format_version,
        }

    def with_scales(self, centers: list[float] | np.ndarray, loss_range: dict[str, float] | None = None) -> CMWNet:
        """A copy carrying the source run's centers and loss range (set by the meta-train stage)."""
        net = copy.deepcopy(self)
        net.centers = [float(c) for c in centers]
        if loss_range is not None:
            net.loss_range = dict(loss_range)
        return net

    # -- persistence: the mixin's hooks, served by cmw_transfer.artifact.hub (see ``register_backend``) ----------
    def save_pretrained(self, save_directory: str | os.PathLike, *, config: dict[str, Any] | None = None,  # type: ignore[override]
                        repo_id: str | None = None, push_to_hub: bool = False,
                        model_card_kwargs: dict[str, Any] | None = None, **push_to_hub_kwargs: Any) -> str | None:
        """The mixin's ``save_pretrained``: model.safetensors, config.json, curves.png and (unless one is already
        there) README.md; ``config`` adds keys to config.json; ``push_to_hub=True`` then calls :meth:`push_to_hub`."""
        return _backend().save_pretrained(self, save_directory, config=config, repo_id=repo_id,
                                          push_to_hub=push_to_hub, model_card_kwargs=model_card_kwargs,
                                          **push_to_hub_kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        _backend().save_files(self, Path(save_directory))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:  # type: ignore[override]
        """The mixin's ``push_to_hub`` (same keywords); no network and no token are one-line ``UserError``s."""
        return _backend().push_to_hub(self, repo_id, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """A ``huggingface_hub.ModelCard`` for this net (deterministic: the same net gives the same bytes)."""
        return _backend().generate_model_card(self, **kwargs)

    def save_safetensors(self, path: str | os.PathLike) -> None:
        """A lone, self-describing ``.safetensors`` file (the config travels in its header)."""
        _backend().save_safetensors(self, Path(path))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | Any,  # type: ignore[override]
                        **kwargs: Any) -> CMWNet:
        """Load a weights spec: a directory, a ``.safetensors`` file, ``hub:org/name[@rev]``, ``pretrained:NAME``,
        or (as for every Hub mixin class) a bare ``org/name`` repo id when no such local path exists.

        Keywords as the mixin's: ``revision``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token``.
        """
        return _backend().from_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_official(cls, path: str | os.PathLike, **kwargs: Any) -> CMWNet:
        """The authors' released net, converted: see :func:`cmw_transfer.artifact.official.from_official`."""
        return _backend().from_official(path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, **model_kwargs: Any) -> CMWNet:
        return _backend().from_hub(cls, model_id, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, local_files_only=local_files_only, token=token,
                                   **model_kwargs)


_BACKEND: list[ModuleType] = []


def loss_range_of(losses: np.ndarray) -> dict[str, float]:
    """What a net records as its ``loss_range``: min / p1 / p50 / p99 / max of per-sample losses (zeros for none)."""
    q = np.quantile(losses, [0.0, 0.01, 0.5, 0.99, 1.0]) if losses.size else np.zeros(5)
    return dict(zip(("min", "p1", "p50", "p99", "max"), (round(float(v), 6) for v in q)))


def register_backend(module: ModuleType) -> None:
    """Called by :mod:`cmw_transfer.artifact.hub` on import: it serves the persistence methods above, so this
    module (the bottom of the package) imports neither the file format nor the model card."""
    _BACKEND[:] = [module]


def _backend() -> ModuleType:
    if not _BACKEND:  # only reachable if cmw_transfer.artifact's __init__ was bypassed
        raise RuntimeError("cmw_transfer.artifact.hub is not loaded; import cmw_transfer.artifact first")
    return _BACKEND[0]

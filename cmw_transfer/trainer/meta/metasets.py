"""Meta sets: the small trusted set whose loss the weighting net is meta-trained to reduce.

``clean:N``       N ground-truth samples per class held out *before* the bias is applied (needs known truth).
``lowest-loss:N`` the N lowest-loss samples per observed class under the EMA model, rebuilt every epoch (the paper).
``gmm``           samples whose clean posterior under a two-component GMM of normalised losses exceeds 0.5 (FaMUS).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config import MetaSetSpec


def lowest_loss_indices(losses: np.ndarray, targets: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """The ``per_class`` lowest-loss samples of each observed class (sorted indices)."""
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        order = np.argsort(losses[members], kind="stable")[:per_class]
        picked.append(members[order])
    return np.sort(np.concatenate(picked))


def gmm_clean_indices(losses: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices whose posterior of the low-mean component is > 0.5 (losses min-max normalised first)."""
    x = (losses - losses.min()) / max(float(losses.max() - losses.min()), 1e-12)
    gmm = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed).fit(x.reshape(-1, 1))
    clean = int(np.argmin(gmm.means_.reshape(-1)))
    prob = gmm.predict_proba(x.reshape(-1, 1))[:, clean]
    return np.flatnonzero(prob > 0.5)


@torch.no_grad()
def per_sample_losses(model: torch.nn.Module, loader, device: torch.device, size: int) -> np.ndarray:
    """CE of every training sample under ``model`` in eval mode (the authors use the EMA model)."""
    model.eval()
    out = np.full(size, np.inf, dtype=np.float64)
    for batch in loader:
        if batch is None:
            continue
        x, y, idx = batch
        logits = model(x.to(device))
        loss = torch.nn.functional.cross_entropy(logits.float(), y.to(device), reduction="none")
        out[idx.numpy()] = loss.cpu().numpy()
    return out


def stack_batch(ds: Any, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[int(i)] for i in indices]
    return torch.stack([it[0] for it in items]), torch.as_tensor([it[1] for it in items], dtype=torch.long)


class MetaSet:
    """The meta set of a run: the clean samples held out before the bias, or training samples picked again every
    epoch from the teacher's losses (``indices``, checkpointed)."""

    def __init__(self, spec: MetaSetSpec, train: Any, clean: Any, device: torch.device) -> None:
        self.spec, self.train, self.clean, self.device = spec, train, clean, device
        self.indices = None if spec.kind == "clean" else np.arange(0)

    def rebuild(self, teacher: torch.nn.Module, loader: Any, seed: int) -> None:
        """Pick the meta samples again from the losses of every training sample under ``teacher``."""
        if self.spec.kind == "clean":
            return
        losses = per_sample_losses(teacher, loader, self.device, len(self.train))
        if self.spec.kind == "lowest-loss":
            self.indices = lowest_loss_indices(losses, self.train.targets, self.train.num_classes,
                                               self.spec.per_class)
        else:
            self.indices = gmm_clean_indices(losses, seed=seed)
        if self.indices.size == 0:
            raise UserError("the meta set came out empty (GMM found no clean component); "
                            "use --meta-set lowest-loss:N")

    def batch(self, gen: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` meta samples (fewer when the set is smaller) drawn without replacement by ``gen``."""
        if self.spec.kind == "clean":
            ds, pool = self.clean, np.arange(len(self.clean))
        else:
            ds, pool = self.train, self.indices
        take = gen.choice(pool, size=min(size, pool.size), replace=False)
        x, y = stack_batch(ds, take)
        return x.to(self.device), y.to(self.device)

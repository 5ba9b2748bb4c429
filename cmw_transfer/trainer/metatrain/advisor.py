"""Stage ``advisor`` (``metatrain --method advisor``): MFRW / MES advisor networks, run by the engine.

It extends the meta-train stage (same source, meta sets, optimisers, checkpoints, resume, meta-gradient modes);
what differs is the meta-model (:class:`~cmw_transfer.trainer.meta.advisor.AdvisorNet` in the ``wnet`` slot), the
step and the export. Per iteration, after the CE warm-up:

1. loss pre-calculation: one real forward to the pooled features ``f``; plain CE of ``W_c f`` (detached);
2. virtual step: advisor on (f, L) -> mask and s; MES-CE of ``W_c (m * f)``; virtual SGD step of the classifier;
3. meta step: plain CE of the meta batch at the virtual weights, plain features; the advisor steps (Adam);
4. actual step: the same masked/MES loss with the updated advisor (``--actual-step updated``, the paper's order;
   ``reuse`` steps with the gradient of phase 2 instead); the real optimiser steps.

beta ~ Bernoulli(rho) is drawn per sample and per class, once per iteration, shared by phases 2 and 4.

The output is the **classifier** (``classifier.safetensors`` + ``classifier.json`` + ``README.md``): the advisor
is tied to this backbone's feature size and this label set and is discarded at test time, so unlike a CMW-Net it
is not a transferable artifact. The advisor itself is kept in ``checkpoint.pt`` (for ``--resume``) only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file

from cmw_transfer.atomic import atomic_path, write_json, write_text
from cmw_transfer.dataset import resolve_source
from cmw_transfer.defaults import __version__
from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config import parse_advisor
from cmw_transfer.trainer.engine.registry import register_trainer
from cmw_transfer.trainer.meta.advisor import (
    AdvisorNet,
    advise,
    advisor_meta_gradient,
    advisor_terms,
    make_split,
    plain_losses,
)
from cmw_transfer.trainer.metatrain.stage import MetaTrainer

CLASSIFIER_NAME = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
CARD_NAME = "README.md"


@register_trainer("advisor")
class AdvisorTrainer(MetaTrainer):
    """The meta-train stage with an advisor in place of the weighting net; exports the classifier."""

    def build_meta_model(self) -> tuple[AdvisorNet, None]:
        self.split = make_split(self.model)  # one-line error for a backbone without the feature/head split
        self.parts = parse_advisor(self.cfg.advisor)
        feature_dim = self.split.head.in_features
        return AdvisorNet(feature_dim, self.num_classes, self.parts).to(self.device), None

    def begin_epoch(self, epoch: int) -> str:
        note = super().begin_epoch(epoch)
        self.sums.update(mask=0.0, s=0.0, advised=0)
        return note

    def beta(self, batch_size: int) -> torch.Tensor:
        """beta ~ Bernoulli(rho) per sample and class, from the epoch's generator (exact resume)."""
        draw = self.gen.random((batch_size, self.num_classes)) < self.cfg.advisor_rho
        return torch.as_tensor(draw, dtype=torch.float32, device=self.device)

    def train_step(self, it: int, batch: Any) -> int:
        split = self.split
        x, y, idx = batch
        x, y = x.to(self.device), y.to(self.device)
        f = split.view(x)  # the real forward: BatchNorm's running statistics move once per iteration
        head = split.head_params(self.params)
        plain = plain_losses(split, head, f, y)
        self.check_finite(plain, it)
        reused = None
        if self.is_weighted:
            beta = self.beta(len(y))
            if self.meta_step_due(it):
                reused = self.meta_step(lambda meta_x, meta_y, step, momentum, reuse: advisor_meta_gradient(
                    self.model, self.wnet, self.params, self.buffers, x, y, beta, meta_x, meta_y, step, self.virtual,
                    momentum_buffers=momentum, gates=self.gates, features=f, keep_graph=not reuse, all_grads=reuse))
            with torch.no_grad():
                mask, s = advise(self.wnet, None, f, plain)
            loss = advisor_terms(split, head, f, y, mask, s, beta).mean()
            self._track(mask, s)
        else:
            loss = F.cross_entropy(split.logits(head, f), y)
        self.actual_step(loss, reused, idx, plain)
        return len(y)

    def _track(self, mask: torch.Tensor | None, s: torch.Tensor | None) -> None:
        self.sums["mask"] += float(mask.mean()) if mask is not None else 0.0
        self.sums["s"] += float(s.mean()) if s is not None else 0.0
        self.sums["advised"] += 1

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        sums, losses = self.sums, self.last_loss
        advised = sums["advised"]
        row = {**self.epoch_row(seconds),
               "mask_mean": sums["mask"] / advised if advised and "mfrw" in self.parts else None,
               "mes_s_mean": sums["s"] / advised if advised and "mes" in self.parts else None}
        self.last_losses = losses[np.isfinite(losses)]
        self.saved_loss_range = None
        return row

    # -- the export: the classifier ---------------------------------------------------------------------------------
    def start(self, epoch: int) -> None:
        if epoch >= self.cfg.epochs and (self.out / CLASSIFIER_NAME).is_file():
            raise UserError(f"--resume: the run in {self.out} finished all {self.cfg.epochs} epochs and its "
                            f"classifier is exported ({CLASSIFIER_NAME}): nothing to resume")

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        final = rows[-1] if rows else {}
        self.export(final)
        return {"out": str(self.out), "final": final, "classifier": str(self.out / CLASSIFIER_NAME)}

    def export(self, final: dict[str, Any] | None = None) -> None:  # type: ignore[override]
        cfg = self.cfg
        in_chans = self.data.train[0][0].shape[0]
        info = {
            "model": cfg.model, "num_classes": self.num_classes, "in_chans": int(in_chans),
            "feature_dim": self.split.head.in_features, "classifier": self.split.prefix,
            "source": cfg.src, "bias": str(resolve_source(cfg.src, cfg.noise, cfg.imbalance)[1]) or "none",
            "method": "advisor", "advisor": list(self.parts), "advisor_rho": cfg.advisor_rho,
            "meta_grad": cfg.meta_grad, "meta_set": cfg.meta_set, "epochs": cfg.epochs, "seed": cfg.seed,
            "toolkit_version": __version__,
            "final": {k: v for k, v in (final or {}).items() if k.startswith("test_")},
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(self.out / CLASSIFIER_NAME) as tmp:
            save_file(state, str(tmp), metadata={"cmw_transfer": json.dumps(info, sort_keys=True)})
        write_json(self.out / CLASSIFIER_CONFIG, info)
        write_text(self.out / CARD_NAME, model_card(info))


def model_card(info: dict[str, Any]) -> str:
    """The classifier's model card: what it is, how it was trained, how to load it."""
    parts = "+".join(p.upper() for p in info["advisor"])
    scores = ", ".join(f"{k} {v:.4f}" for k, v in info["final"].items() if isinstance(v, float)) or "not evaluated"
    return (
        "---\nlibrary_name: cmw-transfer\ntags:\n- advisor-network\n- image-classification\n---\n\n"
        f"# {info['model']} trained with an advisor network ({parts})\n\n"
        f"A {info['num_classes']}-class `{info['model']}` classifier trained on `{info['source']}` "
        f"(bias: {info['bias']}) by meta-learned feature re-weighting / equalisation softmax "
        f"(meta set {info['meta_set']}, meta-gradient {info['meta_grad']}, {info['epochs']} epochs, "
        f"seed {info['seed']}).\n\nFinal test: {scores}.\n\n"
        "The advisor is not included: it is tied to this backbone's feature size and label set and is not used "
        "at test time. The classifier runs on plain features with the plain softmax.\n\n"
        "```python\nfrom safetensors.torch import load_file\nfrom cmw_transfer.models import create_model\n\n"
        f"model = create_model(\"{info['model']}\", {info['num_classes']}, in_chans={info['in_chans']})\n"
        f"model.load_state_dict(load_file(\"{CLASSIFIER_NAME}\"))\nmodel.eval()\n```\n"
    )

"""The probe stage (``probe``): plain ERM under CurveNet's cyclical schedule, recording every sample's loss curve.

CurveNet's first stage (Jiang et al., "Delving into Sample Loss Curve to Embrace Noisy and Imbalanced Data"):
train the classifier on the whole biased set without any weighting, with the O2U-style cyclical learning rate
(``lr`` until the drop, then a square wave between ``cycle_high * lr`` and ``cycle_low * lr``), and record each
sample's training loss (the normal training-mode forward, before the step) once per epoch.

The losses go to ``losses.npy``, an ``N x T`` float16 ``.npy`` file opened as a memory map
(:func:`numpy.lib.format.open_memmap`): row ``i`` is sample id ``i`` of the training set, column ``t`` epoch
``t``. Nothing holds the array in RAM (2.4M x 150 float16 is 720 MB on disk, one batch of rows in memory); under
DDP every rank writes the rows of its own shard into the same file (the padding DistributedSampler repeats is not
written twice). The file is flushed before each epoch's checkpoint, and a resumed epoch rewrites its whole
column, so a probe killed at any point and resumed gives the identical array. ``probe.json`` says whether the
probe finished; :func:`cmw_transfer.weighting.curves.load_curves` refuses an unfinished one.

The schedule is stated in fractions of the run (``drop_fraction``, ``cycle_fraction``), so the paper's CIFAR
recipe (300 epochs, lr 0.1, drop at 120, square wave 1e-2 / 1e-3 every 15 epochs) and a short probe on the
embedded digits are the same schedule in relative time: what the transferable CurveNet relies on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import timm.optim
import torch
import torch.nn.functional as F  # noqa: N812
from numpy.lib.format import open_memmap
from torch.nn.parallel import DistributedDataParallel

from cmw_transfer.atomic import atomic_path, check_regular, write_json
from cmw_transfer.defaults import PROBE_NAME
from cmw_transfer.errors import UserError
from cmw_transfer.runtime import check_free_space
from cmw_transfer.trainer.config import ProbeConfig, parse_meta_set
from cmw_transfer.trainer.data import load_source, load_train, warn_empty
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.loaders import make_loader
from cmw_transfer.trainer.engine.loop import Stage
from cmw_transfer.trainer.engine.memory import check_model_fits
from cmw_transfer.trainer.engine.registry import register_trainer

LOSSES_NAME = "losses.npy"
LABELS_NAME = "labels.npy"
SUMMARY_NAME = "summary.json"


def cyclical_lr(epoch: int, epochs: int, lr: float, drop_fraction: float, cycle_fraction: float,
                cycle_high: float, cycle_low: float) -> float:
    """The probe's lr at (0-based) ``epoch``: ``lr`` before the drop, then the square wave high/low/high/..."""
    drop = round(drop_fraction * epochs)
    if epoch < drop:
        return lr
    cycle = max(1, round(cycle_fraction * epochs))
    return lr * (cycle_high if ((epoch - drop) // cycle) % 2 == 0 else cycle_low)


def probe_dataset(cfg: ProbeConfig) -> Any:
    """The training set the curves index: apply's layout, or meta-train's (clean meta samples held out)."""
    if cfg.meta_set is None:
        train = load_train(cfg.dataset, cfg.data_root, cfg.noise, cfg.imbalance, seed=cfg.seed)
        warn_empty(train, [], f"--dataset {cfg.dataset}")
        return train
    return load_source(cfg.dataset, cfg.data_root, cfg.noise, cfg.imbalance, seed=cfg.seed,
                       meta=parse_meta_set(cfg.meta_set)).train


def _shard_positions(loader: Any, n: int, rank: int, world: int, step: int, size: int) -> np.ndarray:
    """Which of a batch's rows are real (not DistributedSampler's repeated padding): global position < n."""
    k = step * loader.batch_size + np.arange(size)
    return rank + k * world < n


@register_trainer("probe")
class ProbeTrainer(Stage):
    """Plain ERM under the cyclical schedule; ``train_step`` writes the batch's losses into the memory map."""

    kind = "probe"
    first_epoch = 1
    state_keys = ("model", "optimizer")
    summary_name = SUMMARY_NAME

    @classmethod
    def from_config(cls, cfg: ProbeConfig, ctx: DistributedContext) -> ProbeTrainer:
        """A step that cannot fit (file datasets: timm's input size) is refused before any data is loaded."""
        check_model_fits(cfg.model, cfg.dataset, cfg.batch_size, ctx.device)
        return cls(cfg, ctx)

    def __init__(self, cfg: ProbeConfig, ctx: DistributedContext) -> None:
        from cmw_transfer.models import create_model

        self.cfg, self.ctx = cfg, ctx
        self.out, self.seed, self.progress, self.batch_size = Path(cfg.out), cfg.seed, cfg.progress, cfg.batch_size
        self.log = tuple(cfg.log)
        self.train = probe_dataset(cfg)
        self.n = len(self.train)
        if ctx.is_main and not (cfg.resume and (self.out / LOSSES_NAME).is_file()):  # the map is written in full
            check_free_space(self.out, self.n * cfg.epochs * 2 + 4096,
                             f"the loss curves ({LOSSES_NAME}: {self.n} samples x --epochs {cfg.epochs}, float16)",
                             "lower --epochs or free space")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        in_chans = self.train[0][0].shape[0]
        self.model = create_model(cfg.model, num_classes=self.train.num_classes, in_chans=in_chans).to(ctx.device)
        self.optimizer = timm.optim.create_optimizer_v2(self.model, opt="sgd", lr=cfg.lr, momentum=cfg.momentum,
                                                        weight_decay=cfg.weight_decay)
        # drop_last=False: every sample gets its loss recorded every epoch (a last batch of one sample trains
        # too: convolutional BatchNorm normalises over its pixels)
        self.loader = make_loader(self.train, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                                  distributed=ctx.enabled, drop_last=False)
        self.module: Any = self.model
        self.losses: np.memmap | None = None

    # -- identity and state -------------------------------------------------------------------------------------------
    def total_epochs(self) -> int:
        return self.cfg.epochs

    def fingerprint(self) -> str:
        return self.cfg.fingerprint()

    def identity(self) -> dict[str, Any]:
        return {"samples": self.n}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- the run ------------------------------------------------------------------------------------------------------
    def start(self, epoch: int) -> None:
        path = self.out / LOSSES_NAME
        if self.ctx.is_main and (epoch == 0 or not path.is_file()):
            if epoch:
                raise UserError(f"--resume: {path} is missing; the probe's curves are lost, start over with "
                                "--overwrite")
            check_regular(path)  # a memory map is written in place: never over a FIFO or a device
            open_memmap(path, mode="w+", dtype=np.float16, shape=(self.n, self.cfg.epochs)).flush()
            with atomic_path(self.out / LABELS_NAME) as tmp, open(tmp, "wb") as fh:
                np.save(fh, self.train.targets)
        self.ctx.barrier()  # every rank opens the file rank 0 created
        self.losses = open_memmap(path, mode="r+")
        if self.losses.shape != (self.n, self.cfg.epochs) or self.losses.dtype != np.float16:
            raise UserError(f"--resume: {path} has shape {self.losses.shape} ({self.losses.dtype}), expected "
                            f"{(self.n, self.cfg.epochs)} float16; start over with --overwrite")
        if self.ctx.enabled:
            device = self.ctx.device
            self.module = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                  else None)

    def write_start_files(self, start_epoch: int, resumed: bool) -> None:
        self._write_probe_json(complete=False)

    def _write_probe_json(self, complete: bool) -> None:
        cfg = self.cfg
        write_json(self.out / PROBE_NAME, {
            "config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "schedule": cfg.schedule(),
            "samples": self.n, "epochs": cfg.epochs, "num_classes": int(self.train.num_classes),
            "class_counts": self.train.class_counts().tolist(), "complete": complete,
            "losses": LOSSES_NAME, "labels": LABELS_NAME, "world_size": self.ctx.world_size,
        })

    def begin_epoch(self, epoch: int) -> str:
        cfg = self.cfg
        self.lr = cyclical_lr(epoch, cfg.epochs, cfg.lr, cfg.drop_fraction, cfg.cycle_fraction, cfg.cycle_high,
                              cfg.cycle_low)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.epoch = epoch
        self.stats = torch.zeros(3, dtype=torch.float64)
        self.module.train()
        return f" lr {self.lr:g}"

    def train_loader(self) -> Any:
        return self.loader

    def train_step(self, step: int, batch: Any) -> int:
        x, y, idx = batch
        device = self.ctx.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = self.module(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.record(step, idx.numpy(), losses.detach())
        with torch.no_grad():
            self.stats += torch.tensor([float(losses.sum()), float((logits.argmax(1) == y).sum()), len(y)],
                                       dtype=torch.float64)
        return int(y.shape[0])

    def record(self, step: int, idx: np.ndarray, losses: torch.Tensor) -> None:
        """Column ``epoch`` of the batch's rows; under DDP only the rows this rank owns (no padding repeats)."""
        assert self.losses is not None
        values = losses.float().cpu().numpy().astype(np.float16)
        if self.ctx.enabled:
            keep = _shard_positions(self.loader, self.n, self.ctx.rank, self.ctx.world_size, step, len(idx))
            idx, values = idx[keep], values[keep]
        order = np.argsort(idx, kind="stable")  # ascending rows: sequential pages of the map
        self.losses[idx[order], self.epoch] = values[order]

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        assert self.losses is not None
        self.losses.flush()  # on disk before the checkpoint that says this epoch is done
        s = self.ctx.all_reduce_sum(self.stats).numpy()
        n = max(s[2], 1.0)
        return {"train_loss": float(s[0] / n), "train_acc": float(100.0 * s[1] / n), "lr": self.lr,
                "seconds": round(seconds, 3)}

    def epoch_line(self, row: dict[str, Any]) -> str | None:
        if not self.progress:
            return None
        return f"epoch {row['epoch']} | lr {row['lr']:g} | loss {row['train_loss']:.3f} | train {row['train_acc']:.2f}%"

    def finish(self, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        if self.losses is not None:
            self.losses.flush()
        if self.ctx.is_main:
            self._write_probe_json(complete=True)
        return {"out": str(self.out), "samples": self.n, "epochs": self.cfg.epochs, "losses": str(self.out /
                LOSSES_NAME), "final": rows[-1] if rows else {}, "seconds_this_session": seconds}


def probe_command(cfg: ProbeConfig) -> str:
    """The CLI line that produces a probe of ``cfg``'s data and schedule (for error messages)."""
    parts = ["cmw-transfer probe", f"--dataset {cfg.dataset}"]
    for name in ("noise", "imbalance", "meta_set"):
        value = getattr(cfg, name)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value}")
    parts.append(f"--epochs {cfg.epochs} --seed {cfg.seed} --out PROBE_DIR")
    return " ".join(parts)

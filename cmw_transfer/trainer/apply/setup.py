"""What every apply stage shares, built once per run before the stage: data and loaders, the frozen net's
criterion and families, AMP, the run directory (:class:`RunSetup`, :func:`build_setup`), and the up-front memory
check of one step."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmw_transfer.artifact.load import Loaded, load
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from cmw_transfer.trainer.apply.openset import prepare_open_set
from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.trainer.data import check_model_name, load_datasets
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.evaluation import amp_setup
from cmw_transfer.trainer.engine.loaders import make_loader
from cmw_transfer.trainer.engine.memory import check_model_fits
from cmw_transfer.weighting.base import Criterion
from cmw_transfer.weighting.baselines import ClassBalancedWeighting, FocalWeighting
from cmw_transfer.weighting.cmw import CMWLoss
from cmw_transfer.weighting.families import target_families


@dataclass
class RunSetup:
    """What every apply trainer shares: data and loaders, the frozen net's criterion and families, AMP, the run dir."""

    cfg: ApplyConfig
    ctx: DistributedContext
    out: Path
    net: CMWNet | None
    net_identity: dict[str, Any]
    families: dict[str, Any] | None
    criterion: Criterion | None
    train_ds: Any
    eval_sets: list[tuple[str, Any]]
    open_ds: Any
    counts: np.ndarray
    num_classes: int
    in_chans: int
    train_loader: Any
    eval_loaders: list[tuple[str, Any]]
    open_loader: Any
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    is_clean: torch.Tensor | None


def build_setup(cfg: ApplyConfig, ctx: DistributedContext) -> RunSetup:
    """The net of ``--weights`` (loaded once, with its identity), the target's data, families and criterion."""
    from cmw_transfer.models import input_geometry

    check_model_name(cfg.model)
    # --weighting none ignores --weights, so the baseline is the same command with one option changed
    loaded = load(cfg.weights) if cfg.weights and cfg.weighting == "cmw" else None
    if cfg.curves and (loaded is None or loaded.kind != "curvenet"):
        raise UserError("--curves is read by a CurveNet only: give --weights a CurveNet artifact (metatrain "
                        "--method curvenet --curvenet-mode transferable), or drop --curves")
    net = loaded.net if loaded is not None and loaded.kind == "cmwnet" else None
    if net is not None and cfg.families is not None and cfg.families != net.num_heads:
        target_families(net, np.zeros(0), cfg.families)  # raises the K mismatch before data is loaded

    with warnings.catch_warnings():
        if not ctx.is_main:  # the empty-classes warning once, not once per rank
            warnings.simplefilter("ignore")
        train_ds, eval_sets = load_datasets(cfg)
    open_ds = None
    if cfg.open_classes or cfg.open_dataset or cfg.dataset.strip() == "imagenet-lt":
        train_ds, eval_sets, open_ds = prepare_open_set(cfg, train_ds, eval_sets)
    counts = train_ds.class_counts()
    if int((counts > 0).sum()) < 2:
        raise UserError(f"the training set has {int((counts > 0).sum())} class(es) with samples: a classifier "
                        "needs at least 2; check --dataset / --noise / --imbalance")
    families = run_families(net, counts, cfg, ctx) if net is not None else None
    criterion = make_criterion(cfg, loaded, families, train_ds)
    if criterion is not None:
        criterion = criterion.to(ctx.device)

    def loader(ds: Any, train: bool) -> Any:
        return make_loader(ds, cfg.batch_size, train=train, workers=cfg.workers, seed=cfg.seed,
                           distributed=ctx.enabled)

    amp_dtype, scaler = amp_setup(cfg.amp, ctx.device)
    is_clean = None
    if train_ds.clean_targets is not None:
        is_clean = torch.as_tensor(train_ds.targets == train_ds.clean_targets, device=ctx.device)
    return RunSetup(cfg=cfg, ctx=ctx, out=Path(cfg.out), net=net, net_identity=loaded.identity if loaded else {},
                    families=families, criterion=criterion, train_ds=train_ds, eval_sets=eval_sets, open_ds=open_ds,
                    counts=counts, num_classes=int(train_ds.num_classes),
                    in_chans=input_geometry(getattr(train_ds, "input_shape", (3, 0, 0)), cfg.img_size)[0],
                    train_loader=loader(train_ds, True),
                    eval_loaders=[(label, loader(ds, False)) for label, ds in eval_sets],
                    open_loader=loader(open_ds, False) if open_ds is not None else None, amp_dtype=amp_dtype,
                    scaler=scaler, is_clean=is_clean)


def run_families(net: CMWNet, counts: np.ndarray, cfg: ApplyConfig, ctx: DistributedContext) -> dict[str, Any]:
    """The target's class-size families (``families.json``), the same on every rank (checked)."""
    with warnings.catch_warnings():
        if not ctx.is_main:  # the same warning once, not once per rank
            warnings.simplefilter("ignore")
        families = target_families(net, counts, cfg.families)  # deterministic: seeded k-means
    digests = ctx.all_gather_object(families["digest"])
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the target families: {digests}")
    families["rank_digests"] = digests
    families["ranks_agree"] = True
    return families


def make_criterion(cfg: ApplyConfig, loaded: Loaded | None, families: dict[str, Any] | None, train_ds: Any
                   ) -> Criterion | None:
    """``--weighting``'s criterion (None: plain cross-entropy), every one a :class:`Criterion`."""
    counts = train_ds.class_counts()
    if loaded is not None and loaded.kind == "cmwnet":
        assert families is not None
        return CMWLoss(loaded.net, families["family_of_class"], cfg.normalization,
                       min_class_weight=cfg.min_class_weight)
    if loaded is not None:
        from cmw_transfer.weighting.curves import curve_criterion, probe_hint_for

        return curve_criterion(loaded.net, cfg.curves, train_ds, cfg.normalization, probe_hint_for(cfg, loaded.net))
    if cfg.weighting == "focal":
        return FocalWeighting(cfg.focal_gamma, cfg.normalization)
    if cfg.weighting == "class-balanced":
        return ClassBalancedWeighting(counts, cfg.cb_beta, cfg.normalization)
    if cfg.weighting == "eql":
        from cmw_transfer.weighting.eql import EQLWeighting

        return EQLWeighting(counts, cfg.eql_threshold, cfg.eql_rho, cfg.normalization)
    return None


def check_memory(cfg: ApplyConfig, device: torch.device) -> None:
    """Refuse a step that cannot fit in memory (:mod:`cmw_transfer.trainer.engine.memory`); CPU ranks of one machine
    share its memory."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    check_model_fits(cfg.model, cfg.dataset, cfg.batch_size, device, img_size=cfg.img_size, processes=processes,
                     half_precision=cfg.amp)

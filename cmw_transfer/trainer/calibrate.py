"""A loss range for a net that records none (the authors' released nets): a short plain-CE run on a dataset."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.artifact.net import loss_range_of
from cmw_transfer.dataset import create_dataset
from cmw_transfer.dataset.images import DEFAULT_INPUT_SIZE
from cmw_transfer.errors import UserError
from cmw_transfer.models import create_model, input_geometry
from cmw_transfer.trainer.engine.distributed import resolve_device
from cmw_transfer.trainer.engine.loaders import make_loader
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler


def calibrate_loss_range(spec: str, *, data_dir: str | None = None, model: str = "small_cnn", epochs: int = 3,
                         batch_size: int = 128, lr: float = 0.05, seed: int = 0, device: str = "cpu",
                         img_size: int | None = None) -> tuple[dict[str, float], str]:
    """A short plain cross-entropy run on ``spec``; ``(loss_range, note)`` from the per-sample losses of its last epoch.

    The same statistic the meta-train stage records (min, p1, p50, p99, max of the training losses seen in the last
    epoch, train mode, observed labels), but from a plain-CE run of a small model: a rough scale of the losses the
    net will see, not the authors' source range.
    """
    if epochs < 1:
        raise UserError(f"--calibrate-epochs must be >= 1, got {epochs}")
    transform = None
    if img_size is not None:
        from cmw_transfer.dataset.images import make_transform

        transform = make_transform("train", img_size)
    try:
        ds = create_dataset(spec, data_dir, "train", transform=transform, seed=seed)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(f"--calibrate-on {spec}: {exc}; point --calibrate-data-dir at the data") from None
    torch.manual_seed(seed)
    dev = resolve_device(device)
    # the input the model sees (RGB at img_size once resized), checked by one dry forward before any training
    shape = getattr(ds, "input_shape", None)  # None: image files, resized by timm's default transform
    geometry = input_geometry(shape, img_size if img_size is not None or shape is not None else DEFAULT_INPUT_SIZE)
    net = create_model(model, num_classes=int(ds.num_classes), in_chans=geometry[0], img_size=img_size,
                       input_size=None if img_size else geometry[1:], resizable=False).to(dev)
    loader = make_loader(ds, batch_size, train=True, workers=0, seed=seed, distributed=False)
    optimizer, scheduler = create_optimizer_and_scheduler(net, lr=lr, epochs=epochs, steps_per_epoch=len(loader))
    updates = 0
    losses: list[torch.Tensor] = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        net.train()
        losses = []
        for batch in loader:
            if batch is None:
                continue
            x, y = batch[0].to(dev), batch[1].to(dev)
            per_sample = F.cross_entropy(net(x).float(), y, reduction="none")
            losses.append(per_sample.detach().cpu())
            optimizer.zero_grad(set_to_none=True)
            per_sample.mean().backward()
            optimizer.step()
            updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=updates)
    seen = torch.cat(losses).numpy() if losses else np.zeros(0)
    seen = seen[np.isfinite(seen)]
    if seen.size == 0:
        raise UserError(f"--calibrate-on {spec}: no training losses were seen (empty or unreadable dataset)")
    loss_range = loss_range_of(seen)
    note = (f"calibrated by cmw-transfer, not the authors' source range: per-sample CE of the last of {epochs} "
            f"plain-CE epoch(s) of {model} on {spec} ({seen.size} samples, lr {lr}, seed {seed})")
    return loss_range, note

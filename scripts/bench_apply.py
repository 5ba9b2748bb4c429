"""Cost of the apply stage against plain ERM, side by side in one process, plus DataLoader throughput.

    python scripts/bench_apply.py                     # resnet18, 32x32, batch 64, CPU; about 1-3 minutes
    python scripts/bench_apply.py --device cuda --batch-size 256 --repeats 15

ERM step: ``zero_grad; CE(model(x), y).backward(); step``, written out by hand. Apply step: the real
:class:`cmw_transfer.trainer.apply.steps.ApplyStepper` with a frozen CMW-Net (K=3, hidden 100, the paper's size),
including its on-device statistics. Soft-label mode is the same stepper with EMA teacher, pseudo-labels and mixup,
reported separately because its teacher forward is part of the method. Each repeat times every mode for the same
number of steps, in rotating order, on identical model copies; the table gives medians over repeats of per-step
time and of the per-repeat ratio to ERM. Data loading: images/s of ``make_loader`` over copies of the embedded
digits, raw tensors and with a PIL augmentation, total and per worker.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import click
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.models import create_model
from cmw_transfer.trainer.apply.steps import ApplyStepper, SoftLabelState
from cmw_transfer.trainer.engine.distributed import resolve_device
from cmw_transfer.trainer.engine.loaders import make_loader
from cmw_transfer.trainer.engine.optim import create_optimizer_and_scheduler
from cmw_transfer.weighting import CMWLoss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], object], steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def bench_steps(model_name: str, batch_size: int, img_size: int, num_classes: int, repeats: int, steps: int,
                warmup: int, device: torch.device) -> dict[str, list[float]]:
    torch.manual_seed(0)
    base = create_model(model_name, num_classes=num_classes, in_chans=3).to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    idx = torch.arange(batch_size, device=device)
    counts = np.linspace(500, 50, num_classes).astype(int)
    criterion = CMWLoss.from_net(CMWNet(hidden_size=100, num_heads=3), counts).to(device)

    def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
        return create_optimizer_and_scheduler(model, opt="sgd", lr=0.01, weight_decay=5e-4, momentum=0.9,
                                              sched="none")[0]

    erm_model = copy.deepcopy(base)
    erm_opt = optimizer_for(erm_model)

    def erm_step() -> None:
        erm_model.train()
        erm_opt.zero_grad(set_to_none=True)
        F.cross_entropy(erm_model(x), y).backward()
        erm_opt.step()

    cmw_model = copy.deepcopy(base)
    cmw = ApplyStepper(cmw_model, optimizer_for(cmw_model), criterion=criterion)
    sl_model = copy.deepcopy(base)
    soft = SoftLabelState(sl_model, np.asarray(y.cpu()), num_classes, device=device, decay=0.997, alpha=1.0,
                          batch_size=batch_size)
    sl = ApplyStepper(sl_model, optimizer_for(sl_model), criterion=criterion, soft=soft)

    modes: dict[str, Callable[[], object]] = {
        "erm": erm_step,
        "cmw": lambda: cmw(x, y, idx, True),
        "cmw_sl": lambda: sl(x, y, idx, True),
    }
    for fn in modes.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so no mode always runs first
        for name in order:
            times[name].append(_time_steps(modes[name], steps, device))
        cmw.reset_stats()  # as at an epoch boundary
        sl.reset_stats()
    return times


def bench_loss_ops(batch_size: int, num_classes: int, iters: int, device: torch.device) -> tuple[float, float]:
    """ms per step of the loss head alone: plain CE vs CE + frozen net + coefficients + the stepper's statistics.

    Their difference is the whole extra work of an apply step (the model forward / backward are identical), timed
    over many iterations, so it is a low-noise complement to the end-to-end ratio above.
    """
    from cmw_transfer.weighting import loss_coefficients

    torch.manual_seed(0)
    logits = torch.randn(batch_size, num_classes, device=device, requires_grad=True)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    idx = torch.arange(batch_size, device=device)
    counts = np.linspace(500, 50, num_classes).astype(int)
    criterion = CMWLoss.from_net(CMWNet(hidden_size=100, num_heads=3), counts).to(device)
    stepper = ApplyStepper(torch.nn.Linear(1, 1).to(device), torch.optim.SGD([logits], lr=0.0), criterion=criterion)

    def plain() -> None:
        F.cross_entropy(logits, y).backward()

    def weighted() -> None:
        losses = F.cross_entropy(logits, y, reduction="none")
        w = criterion.weights(losses, y)
        loss = (loss_coefficients(w, "batch") * losses).sum()
        loss.backward()
        stepper._record(loss, logits, y, idx, w)

    out = []
    for fn in (plain, weighted):
        for _ in range(20):
            fn()
        out.append(1000 * min(_time_steps(fn, iters, device) for _ in range(5)))
        stepper.reset_stats()
    return out[0], out[1]


def bench_loader(batch_size: int, workers_list: list[int], passes: int) -> list[tuple[str, int, float]]:
    """images/s over ``passes`` copies of digits train (so worker start-up is amortised), raw and PIL-augmented."""
    from torchvision import transforms

    from cmw_transfer.dataset import create_dataset

    rows = []
    for label, transform in (("in-memory tensors", None),
                             ("PIL crop + flip + ToTensor", transforms.Compose([
                                 transforms.RandomCrop(8, padding=1), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor()]))):
        ds = create_dataset("digits", split="train", transform=transform)
        ds = ds.subset(np.tile(np.arange(len(ds)), passes))
        for workers in workers_list:
            loader = make_loader(ds, batch_size, train=True, workers=workers, seed=0, distributed=False)
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += batch[1].shape[0]
            rows.append((label, workers, n / (time.perf_counter() - t0)))
    return rows


@click.command()
@click.option("--model", "model_name", default="resnet18", show_default=True, help="timm model name.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--img-size", type=int, default=32, show_default=True)
@click.option("--num-classes", type=int, default=10, show_default=True)
@click.option("--repeats", type=int, default=15, show_default=True, help="Timed rounds (the median is reported).")
@click.option("--steps", type=int, default=5, show_default=True, help="Steps per mode per round.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
@click.option("--loader-workers", default="0,1,2", show_default=True, help="Worker counts for the loader table.")
@click.option("--loader-passes", type=int, default=10, show_default=True,
              help="Copies of digits train per loader measurement.")
def main(model_name: str, batch_size: int, img_size: int, num_classes: int, repeats: int, steps: int, warmup: int,
         device: str, threads: int | None, loader_workers: str, loader_passes: int) -> None:
    """Print markdown tables: step time of ERM vs apply (cmw, cmw + soft labels), and loader images/s."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    times = bench_steps(model_name, batch_size, img_size, num_classes, repeats, steps, warmup, dev)
    erm = times["erm"]
    click.echo(f"\n### Apply step vs ERM step: {model_name}, {img_size}x{img_size}, batch {batch_size}, {dev} "
               f"({torch.get_num_threads()} threads), median of {repeats} rounds x {steps} steps\n")
    click.echo("| mode | ms / step (median) | ratio to ERM (median of rounds) | min ratio | max ratio |")
    click.echo("|---|---|---|---|---|")
    for name, label in (("erm", "ERM (plain CE)"), ("cmw", "apply, frozen CMW-Net"),
                        ("cmw_sl", "apply, CMW-Net-SL (teacher + mixup)")):
        ratios = [t / e for t, e in zip(times[name], erm, strict=True)]
        click.echo(f"| {label} | {1000 * statistics.median(times[name]):.1f} | {statistics.median(ratios):.3f} | "
                   f"{min(ratios):.3f} | {max(ratios):.3f} |")
    ce_ms, cmw_ms = bench_loss_ops(batch_size, num_classes, 200, dev)
    erm_ms = 1000 * statistics.median(erm)
    click.echo(f"\nLoss head alone (best of 5 x 200 iterations, forward + backward): plain CE {ce_ms:.3f} ms, "
               f"CE + frozen CMW-Net + coefficients + statistics {cmw_ms:.3f} ms; the difference, "
               f"{cmw_ms - ce_ms:.3f} ms, is {100 * (cmw_ms - ce_ms) / erm_ms:.2f}% of the median ERM step.")
    workers = [int(w) for w in loader_workers.split(",") if w.strip()]
    click.echo(f"\n### DataLoader throughput: {loader_passes} x digits train (1347 images), batch {batch_size}, "
               "worker start-up included\n")
    click.echo("| samples | workers | images/s | images/s per worker |")
    click.echo("|---|---|---|---|")
    for label, w, rate in bench_loader(batch_size, workers, loader_passes):
        per = f"{rate / w:.0f}" if w else "- (main process)"
        click.echo(f"| {label} | {w} | {rate:.0f} | {per} |")


if __name__ == "__main__":
    main()

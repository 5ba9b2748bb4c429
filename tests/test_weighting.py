"""CMWLoss as a drop-in for timm's losses, the numpy entry point, and the cross-rank class-count check."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.errors import UserError
from cmw_transfer.weighting import CMWLoss, check_same_across_ranks, loss_coefficients, sample_weights
from tests.helpers import downweighting_net, make_net

COUNTS = [5, 5, 40, 40, 200, 200]  # three families of two classes each


def criterion(**kwargs) -> CMWLoss:
    return CMWLoss.from_net(make_net(seed=1), COUNTS, **kwargs)


def batch(n=12, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, requires_grad=True), torch.randint(0, c, (n,), generator=g)


def test_hard_targets_are_the_weighted_cross_entropy():
    """The default divides by the weights' sum; ``"batch"`` (the paper's meta-training form) by the batch size."""
    crit = criterion()
    logits, y = batch()
    losses = F.cross_entropy(logits, y, reduction="none")
    w = crit.net(losses.detach(), crit.family_of_class[y])
    torch.testing.assert_close(crit(logits, y), (w * losses).sum() / w.sum())
    torch.testing.assert_close(criterion(normalization="batch")(logits, y), (w * losses).sum() / len(y))


def test_one_hot_soft_targets_equal_hard_targets():
    crit = criterion()
    logits, y = batch()
    soft = F.one_hot(y, 6).float()
    torch.testing.assert_close(crit(logits, soft), crit(logits, y))
    losses = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(crit.weights(losses, soft), crit.weights(losses, y))


def test_timm_mixup_soft_targets_blend_the_two_heads():
    from timm.data import Mixup

    crit = criterion()
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=6)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    y = torch.tensor([0, 2, 4, 1, 3, 5, 0, 4])
    _, soft = mixup(x, y)  # timm pairs sample i with sample B-1-i, weight lam
    lam = float(soft[0, y[0]])
    assert 0.01 < lam < 0.99 and float(soft[0, y[-1]]) == pytest.approx(1 - lam)  # a real mix of two labels
    logits = torch.randn(8, 6, requires_grad=True)
    losses = F.cross_entropy(logits, soft, reduction="none")
    w = crit.weights(losses, soft)
    fam = crit.family_of_class
    for i in range(8):
        j = 7 - i
        expected = lam * crit.net(losses[i:i + 1].detach(), fam[y[i]].view(1)) + \
            (1 - lam) * crit.net(losses[i:i + 1].detach(), fam[y[j]].view(1))
        torch.testing.assert_close(w[i:i + 1], expected)
    loss = crit(logits, soft)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None


def test_ignore_index_drops_samples_and_batch_counts_the_rest():
    crit = criterion(ignore_index=-1)
    logits, y = batch()
    y_ignored = y.clone()
    y_ignored[::3] = -1
    keep = y_ignored != -1
    torch.testing.assert_close(crit(logits, y_ignored), crit(logits[keep], y[keep]))
    every = torch.full_like(y, -1)
    zero = crit(logits, every)
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_label_smoothing_weights_the_smoothed_loss():
    crit = criterion(label_smoothing=0.1)
    logits, y = batch()
    losses = F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    w = crit.net(losses.detach(), crit.family_of_class[y])
    torch.testing.assert_close(crit(logits, y), (w * losses).sum() / w.sum())
    with pytest.raises(ValueError):
        criterion(label_smoothing=1.5)


def test_sum_normalisation_is_per_call():
    w = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(loss_coefficients(w, "sum"), w / 1.0)
    crit = criterion(normalization="sum")
    logits, y = batch()
    losses = F.cross_entropy(logits, y, reduction="none")
    w = crit.net(losses.detach(), crit.family_of_class[y])
    torch.testing.assert_close(crit(logits, y), (w * losses).sum() / w.sum())


def test_numpy_entry_point_matches_the_module(tmp_path):
    net = downweighting_net()
    counts = [10, 10, 50, 50, 100, 100]
    rng = np.random.default_rng(0)
    losses = rng.uniform(0, 5, 40)
    labels = rng.integers(0, 6, 40)
    w = sample_weights(losses, labels, counts, net)
    assert isinstance(w, np.ndarray) and w.shape == (40,) and ((w >= 0) & (w <= 1)).all()
    ref = CMWLoss.from_net(net, counts).weights(torch.as_tensor(losses, dtype=torch.float32),
                                                torch.as_tensor(labels))
    np.testing.assert_allclose(w, ref.numpy(), rtol=1e-6)
    assert w[np.argmin(losses)] > w[np.argmax(losses)]  # this net falls with the loss
    net.save_pretrained(tmp_path / "n")
    np.testing.assert_allclose(sample_weights(losses, labels, counts, str(tmp_path / "n")), w, rtol=1e-6)
    soft = np.eye(6)[labels]
    np.testing.assert_allclose(sample_weights(losses, soft, counts, net), w, rtol=1e-6)
    with pytest.raises(ValueError, match="labels must lie"):
        sample_weights(losses, labels + 6, counts, net)
    with pytest.raises(ValueError, match="losses but"):
        sample_weights(losses[:3], labels, counts, net)


def test_check_same_across_ranks_is_a_no_op_without_a_process_group():
    check_same_across_ranks([1, 2, 3])


def _rank_worker(rank: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        outcomes = []
        for counts in ([5, 40, 200], [5, 40, 200 + rank], [5, 40] + [200] * (rank + 1)):
            try:
                CMWLoss.from_net(make_net(), counts, process_group=None)
                outcomes.append("ok")
            except UserError as exc:
                outcomes.append(str(exc))
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as fh:
            fh.write("\n".join(outcomes))
    finally:
        dist.destroy_process_group()


def test_class_counts_checked_across_two_gloo_ranks(tmp_path):
    code = ("import sys, torch.multiprocessing as mp; from tests.test_weighting import _rank_worker; "
            "mp.start_processes(_rank_worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method='fork')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "init"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        same, different, lengths = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert same == "ok"
        assert "differ across ranks for 1 class(es) (first: class 2)" in different
        assert "between 3 and 4 classes" in lengths


def test_package_exports_without_importing_torch_eagerly():
    code = ("import sys, cmw_transfer; assert 'torch' not in sys.modules, 'torch imported'; "
            "from cmw_transfer import CMWLoss, CMWNet, sample_weights; print(CMWLoss.__name__, CMWNet.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["CMWLoss", "CMWNet"], out.stderr

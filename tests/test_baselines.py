import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.weighting.baselines import ClassBalancedWeighting, FocalWeighting


def test_focal_weight_is_one_minus_pt_to_the_gamma():
    logits = torch.randn(16, 5)
    y = torch.randint(0, 5, (16,))
    losses = F.cross_entropy(logits, y, reduction="none")
    p_t = torch.softmax(logits, 1)[torch.arange(16), y]
    torch.testing.assert_close(FocalWeighting(2.0).weights(losses, y), (1 - p_t) ** 2)
    assert torch.equal(FocalWeighting(0.0).weights(losses, y), torch.ones(16))


def test_focal_weight_increases_with_loss():
    w = FocalWeighting(1.5).weights(torch.tensor([0.01, 0.5, 2.0, 6.0]), torch.zeros(4, dtype=torch.long))
    assert torch.all(w[1:] > w[:-1])


def test_class_balanced_weights_follow_effective_number():
    counts = np.array([1000, 100, 10])
    cb = ClassBalancedWeighting(counts, beta=0.99)
    effective = (1 - 0.99 ** counts) / (1 - 0.99)
    expected = (1 / effective) * 3 / (1 / effective).sum()
    torch.testing.assert_close(cb.class_weight, torch.tensor(expected, dtype=torch.float32))
    w = cb.weights(torch.zeros(3), torch.tensor([0, 1, 2]))
    assert w[0] < w[1] < w[2]
    assert torch.allclose(ClassBalancedWeighting(counts, beta=0.0).class_weight, torch.ones(3))


def test_bad_parameters():
    with pytest.raises(ValueError):
        FocalWeighting(-1)
    with pytest.raises(ValueError):
        ClassBalancedWeighting([1, 2], beta=1.0)


def test_loss_is_weighted_mean():
    logits, y = torch.randn(8, 3, requires_grad=True), torch.randint(0, 3, (8,))
    cb = ClassBalancedWeighting([5, 50, 500], beta=0.9)
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(cb(logits, y), (cb.class_weight[y] * ce).mean())


def test_apply_runs_the_fixed_baselines(tmp_path):
    from cmw_transfer.trainer.config import ApplyConfig
    from cmw_transfer.trainer.engine.launch import run_stage

    torch.set_num_threads(1)
    for weighting in ("focal", "class-balanced"):
        cfg = ApplyConfig(dataset="digits", imbalance=5.0, out=str(tmp_path / weighting), weighting=weighting,
                          model="small_cnn", epochs=2, batch_size=64, lr=0.05, workers=0, device="cpu",
                          progress=False)
        summary = run_stage(cfg)
        assert summary["weighting"] == weighting and summary["final"]["test_top1"] > 20.0

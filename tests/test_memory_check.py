"""The up-front memory estimate: exact on what autograd keeps, refused in one line before any data is loaded."""

from __future__ import annotations

import torch
from torch import nn

from cmw_transfer.models import create_model
from cmw_transfer.trainer.engine.memory import (
    DISABLE_ENV,
    PARAMETER_COPIES,
    available_memory,
    check_step_fits,
    estimate_step,
    planned_geometry,
)
from tests.helpers import call_main


def _saved_bytes_of_a_real_forward(model: nn.Module, x: torch.Tensor) -> int:
    """What autograd keeps for the backward in a real CPU forward, storages counted once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


def test_a_known_model_is_counted_exactly():
    def build():
        return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))

    est = estimate_step(build, (1, 1, 10))
    # the input (10 floats) and the ReLU output, which the second Linear also keeps (one storage): 30 floats
    assert est.activation_bytes_per_sample == 30 * 4
    assert est.parameter_bytes == (10 * 20 + 20 + 20 * 5 + 5) * 4
    assert est.total(8) == 8 * 120 + PARAMETER_COPIES * est.parameter_bytes


def test_the_meta_estimate_equals_what_a_real_forward_keeps():
    for name, size in (("small_cnn", 32), ("resnet18", 64)):
        torch.manual_seed(0)
        est = estimate_step(lambda n=name: create_model(n, num_classes=3, in_chans=3), (3, size, size))
        real = _saved_bytes_of_a_real_forward(create_model(name, num_classes=3, in_chans=3).train(),
                                              torch.randn(2, 3, size, size))
        assert est is not None and est.activation_bytes_per_sample == real // 2, name
        bigger = estimate_step(lambda n=name: create_model(n, num_classes=3, in_chans=3), (3, 2 * size, 2 * size))
        ratio = bigger.activation_bytes_per_sample / est.activation_bytes_per_sample
        assert 3.5 < ratio <= 4.0, (name, ratio)  # a CNN's activations grow with the pixels


def test_available_memory_on_cpu_is_a_plausible_number():
    free = available_memory(torch.device("cpu"))
    assert free is None or 0 < free <= 1 << 50
    assert available_memory(torch.device("meta")) is None


def test_a_model_that_cannot_be_traced_is_not_checked():
    def broken():
        raise RuntimeError("no such layer")

    assert estimate_step(broken, (3, 8, 8)) is None
    assert check_step_fits(broken, "x", (3, 8, 8), 4, torch.device("cpu")) is None


def test_a_step_that_cannot_fit_is_refused_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere.txt"  # never read: the check comes first
    args = ["apply", "--dataset", f"list:{missing}", "--eval-dataset", f"list:{missing}", "--weighting", "none",
            "--model", "resnet50", "--img-size", "1024", "--batch-size", "65536", "--epochs", "1", "--workers", "0",
            "--no-progress", "--device", "cpu", "--out", str(out)]
    code, _, err = call_main(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: one training step of resnet50 at 3x1024x1024 with 65536 samples needs at least")
    assert "available on cpu" in lines[0] and "--batch-size" in lines[0] and DISABLE_ENV in lines[0]
    assert not out.exists()
    monkeypatch.setenv(DISABLE_ENV, "1")  # the escape hatch: the run goes on, to the missing list
    code, _, err = call_main(args, capsys)
    assert code == 2 and "nowhere.txt" in err and "training step" not in err


def test_metatrain_checks_the_meta_batch_too(tmp_path, capsys):
    out = tmp_path / "meta"
    code, _, err = call_main(["metatrain", "--src", f"list:{tmp_path / 'nowhere.txt'}", "--eval-dataset",
                              f"list:{tmp_path / 'nowhere.txt'}", "--model", "resnet50", "--batch-size", "65536",
                              "--device", "cpu", "--quiet", "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: one training step of resnet50 at 3x224x224 with 65636 samples"), err
    assert not out.exists()


def test_the_demo_settings_are_not_refused():
    assert planned_geometry("digits-pmd", None) is None  # the demo's 8x8 digits: nothing to check
    assert planned_geometry("webvision-full", None) == (3, 224, 224)
    est = check_step_fits(lambda: create_model("small_cnn", num_classes=10, in_chans=1), "small_cnn", (1, 8, 8),
                          64, torch.device("cpu"))  # the digits at their own size, had --img-size 8 been given
    assert est is None or 0 < est.total(64) < 64 << 20

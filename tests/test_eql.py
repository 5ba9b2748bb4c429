"""``apply --weighting eql``: the fixed equalization-loss baseline through the apply stage."""

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from cmw_transfer.trainer.apply.steps import weighted_ce
from cmw_transfer.trainer.config import ApplyConfig
from cmw_transfer.weighting.eql import EQLWeighting
from tests.helpers import call_main


def test_apply_step_uses_the_equalized_softmax():
    crit = EQLWeighting([500, 10, 200], threshold=0.05, rho=1.0)  # class 1 is rare
    logits, y = torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([0])
    loss, losses, w = weighted_ce(logits, y, crit, weighted=True)
    want = -0.0 + torch.log(torch.tensor(2.0))  # class 1 left the denominator: log(e^0 + e^0)
    torch.testing.assert_close(losses, want[None])
    assert loss.item() == pytest.approx(want.item()) and w.tolist() == [1.0]
    plain, _, _ = weighted_ce(logits, y, crit, weighted=False)  # warm-up: plain CE
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_eql_options_enter_the_fingerprint_of_eql_runs_only():
    base = dict(dataset="digits", out="o", weighting="none")
    assert ApplyConfig(**base).fingerprint() == ApplyConfig(**base, eql_rho=0.5).fingerprint()
    eql = {**base, "weighting": "eql"}
    assert ApplyConfig(**eql).fingerprint() != ApplyConfig(**eql, eql_rho=0.5).fingerprint()


def test_cli_runs_eql_and_refuses_bad_values(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["apply", "--dataset", "digits", "--imbalance", "10", "--model", "small_cnn", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--no-progress", "--json"]
    code, _, err = call_main([*args, "--weighting", "eql", "--eql-threshold", "0.05", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["weighting"] == "eql"
    code, _, err = call_main([*args, "--weighting", "eql", "--eql-rho", "2", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and err.startswith("error: Invalid value for '--eql-rho'"), err

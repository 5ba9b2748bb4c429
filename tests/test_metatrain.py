"""The meta-train stage end to end on the embedded digits (tiny budgets)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from cmw_transfer.trainer.config import MetaTrainConfig
from tests.faults import crash_at
from tests.helpers import call_main, launch


def small_cfg(tmp_path, **kw):
    base = MetaTrainConfig(src="digits-pmd", out=str(tmp_path / "run"), epochs=3, warmup_epochs=1, batch_size=64,
                           meta_set="clean:5", meta_batch_size=50, device="cpu", seed=0)
    return replace(base, **kw)


def test_run_writes_a_loadable_artifact(tmp_path):
    result = launch(small_cfg(tmp_path)).run()
    out = tmp_path / "run"
    net = CMWNet.from_pretrained(str(out))
    assert net.num_heads == 3 and net.centers == sorted(net.centers)
    assert net.provenance["source"] == "digits-pmd" and net.provenance["method"] == "cmwnet"
    assert set(net.loss_range) == {"min", "p1", "p50", "p99", "max"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["meta_steps"] == 0 and rows[1]["meta_steps"] > 0
    assert 0.0 <= rows[-1]["clean_noisy_auc"] <= 1.0 and "test_top1" in rows[-1]
    assert (out / "curves.png").is_file() and (out / "checkpoint.pt").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["centers"] == result["centers"]


def test_resume_after_interrupted_epoch_is_exact(tmp_path):
    full = launch(small_cfg(tmp_path / "a"))
    full.run()
    cfg = small_cfg(tmp_path / "b")
    broken = launch(cfg)
    with crash_at(3, 4, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):  # in the middle of the last epoch
        broken.run()
    resumed = launch(cfg, resume=True)
    assert resumed.start_epoch == 2
    resumed.run()
    for (k, a), b in zip(full.stage.wnet.state_dict().items(), resumed.stage.wnet.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(full.stage.model.state_dict().items(), resumed.stage.model.state_dict().values()):
        assert torch.equal(a, b), k
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_a_checkpoint_that_counted_epochs_from_0_resumes_exactly_with_its_log_relabelled(tmp_path):
    """Meta-train runs once counted epochs from 0 (checkpoint and metrics.jsonl) and did not record it: such a
    run resumes, exactly, and its log then counts from 1 throughout."""
    full = launch(small_cfg(tmp_path / "a"))
    full.run()
    cfg = small_cfg(tmp_path / "b")
    with crash_at(3, 4, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        launch(cfg).run()
    run = tmp_path / "b" / "run"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["first_epoch"]) == (2, 1)
    del state["first_epoch"]
    state["epoch"] -= 1  # what the earlier version wrote after two epochs
    torch.save(state, run / "checkpoint.pt")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in rows))
    resumed = launch(cfg, resume=True)
    assert resumed.start_epoch == 2
    resumed.run()
    for (k, a), b in zip(full.stage.wnet.state_dict().items(), resumed.stage.wnet.state_dict().values()):
        assert torch.equal(a, b), k
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in after] == [1, 2, 3] and after[:2] == rows[:2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_resume_refuses_other_configuration(tmp_path):
    launch(small_cfg(tmp_path, epochs=1)).run()
    with pytest.raises(UserError, match="different configuration"):
        launch(small_cfg(tmp_path, epochs=1, lr=0.5), resume=True)


def test_meta_learning_beats_erm_under_strong_asymmetric_noise(tmp_path):
    """Same data, model, budget: CMW-Net vs plain CE (warm-up for the whole run = ERM)."""
    common = dict(src="digits", noise="asym:0.4", epochs=6, warmup_epochs=2, meta_set="clean:10",
                  meta_batch_size=100)
    accs = {}
    for name, extra in {"erm": dict(warmup_epochs=6), "cmw": {}}.items():
        trainer = launch(small_cfg(tmp_path / name, **{**common, **extra}))
        accs[name] = trainer.run()["final"]["test_top1"]
    assert accs["cmw"] > accs["erm"] + 3.0, accs


def test_lowest_loss_and_gmm_meta_sets_and_sl(tmp_path):
    for i, kw in enumerate([dict(meta_set="lowest-loss:5"), dict(meta_set="gmm", meta_grad="skip:2"),
                            dict(method="cmwnet-sl", mixup_alpha=1.0, meta_set="lowest-loss:5", meta_grad="famus"),
                            dict(method="mwnet", meta_interval=2, actual_step="updated")]):
        trainer = launch(small_cfg(tmp_path / str(i), epochs=2, **kw))
        result = trainer.run()
        assert np.isfinite(result["final"]["meta_loss"]), kw
        if kw.get("method") == "mwnet":
            assert CMWNet.from_pretrained(str(tmp_path / str(i) / "run")).num_heads == 1


def test_nan_loss_stops_with_checkpoint_intact(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, epochs=3)
    trainer = launch(cfg)
    original = trainer.stage.objective.terms

    def poisoned(logits, batch):
        terms = original(logits, batch)
        return terms * float("nan") if trainer.stage.updates > 25 else terms

    monkeypatch.setattr(trainer.stage.objective, "terms", poisoned)
    with pytest.raises(UserError, match="non-finite training loss"):
        trainer.run()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["wnet"].values())


@pytest.mark.parametrize(("args", "needle"), [
    (["--meta-interval", "0"], "'--meta-interval': 0 is not in the range 1<=x"),
    (["--model", "resnet_does_not_exist"], "unknown model"),
    (["--meta-set", "clean:500"], "needs more than 500 samples"),
    (["--meta-set", "best:3"], "--meta-set must be"),
    (["--meta-grad", "skip:9"], "leaves no stage"),
])
def test_bad_input_exit_2(tmp_path, capsys, args, needle):
    code, _, err = call_main(["metatrain", "--src", "digits-pmd", "--out", str(tmp_path / "o"), "--quiet",
                              "--epochs", "1", *args], capsys)
    assert code == 2 and err.startswith("error: ") and needle in err, err

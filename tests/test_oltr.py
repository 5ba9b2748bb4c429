"""OLTR (``apply --trainer oltr``): memory, centroid loss, meta-embedding, open-set rejection, runs and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.cli import main
from cmw_transfer.dataset import create_dataset
from cmw_transfer.errors import UserError
from cmw_transfer.metrics.openset import calibrated_threshold, open_f_measure, open_macro_f1, open_set_report
from cmw_transfer.models.oltr import (
    CosineNormClassifier,
    MetaEmbeddingHead,
    ModulatedAttention,
    OLTRModel,
    discriminative_centroid_loss,
    reachability,
)
from cmw_transfer.trainer.apply.oltr import ClassAwareSampler
from cmw_transfer.trainer.apply.openset import class_centroids, hold_out_classes, train_eval_view
from cmw_transfer.trainer.config import (
    EQL_FIELDS,
    OLTR_FIELDS,
    RESUME_FREE,
    ApplyConfig,
    config_fingerprint,
    parse_open_classes,
)
from cmw_transfer.trainer.engine.distributed import DistributedContext
from cmw_transfer.trainer.engine.launch import run_stage
from cmw_transfer.trainer.engine.loaders import make_loader
from tests.faults import crash_at

MODEL = "test_resnet"  # a tiny timm model: 96-d pooled features, a 1x1 feature map on 8x8 digits
CPU = DistributedContext(torch.device("cpu"))




@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """w = sigmoid(3 - 3 * loss) on every head, as tests/test_apply.py."""
    net = CMWNet(hidden_size=8, num_heads=3)
    with torch.no_grad():
        net.trunk.weight.fill_(1.0)
        net.trunk.bias.zero_()
        net.heads.weight.fill_(-3.0 / 8)
        net.heads.bias.fill_(3.0)
    path = tmp_path_factory.mktemp("net") / "net"
    net.with_scales([10.0, 50.0, 100.0], {"min": 0.0, "max": 40.0}).save_pretrained(path)
    return path


def oltr_config(out: Path, weights: Path | None, **overrides) -> ApplyConfig:
    base = dict(dataset="digits", out=str(out), weights=str(weights) if weights else None, imbalance=10.0,
                model=MODEL, trainer="oltr", epochs=2, oltr_stage2_epochs=2, warmup_epochs=1, batch_size=64,
                lr=0.05, workers=0, seed=0, progress=False, open_classes=(9,), trust_check="off")
    base.update(overrides)
    return ApplyConfig(**base)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- memory and losses --------------------------------------------------------------------------------------------
def test_class_centroids_are_the_per_class_means_of_the_features():
    ds = create_dataset("digits", imbalance=10)
    loader = make_loader(ds, 50, train=False, workers=0, seed=0, distributed=False)
    proj = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    centroids, counts = class_centroids(lambda x: x.flatten(1) @ proj, loader, CPU, 11)  # class 10 has no sample
    feats = ds.features() @ proj.numpy()
    for c in range(10):
        np.testing.assert_allclose(centroids[c].numpy(), feats[ds.targets == c].mean(0), rtol=1e-5, atol=1e-5)
    assert counts[:10].tolist() == ds.class_counts().tolist() and counts[10] == 0
    np.testing.assert_allclose(centroids[10].numpy(), feats.mean(0), rtol=1e-5, atol=1e-5)  # the empty class


def test_centroid_loss_pulls_to_the_own_centroid_and_pushes_from_the_others():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0])
    # pull only: the gradient points away from the own centroid, so a descent step moves towards it
    v = torch.tensor([[0.5, 0.5]], requires_grad=True)
    loss = discriminative_centroid_loss(v, y, centroids, margin=10.0, push_weight=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.25)  # |v - c0|^2 / 2
    assert torch.allclose(v.grad, v.detach() - centroids[0])
    # push only (v sits on its own centroid): descent moves it away from the other centroid, along -x
    v = torch.zeros(1, 2, requires_grad=True)
    loss = discriminative_centroid_loss(v, y, centroids, margin=10.0, push_weight=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (10.0 - 1.0 / 2))  # mean over B*C = 2 entries, own entry zeroed
    assert v.grad[0, 0] > 0 and v.grad[0, 1] == 0
    # beyond the margin the push stops
    v = torch.zeros(1, 2, requires_grad=True)
    discriminative_centroid_loss(v, y, centroids * 10, margin=10.0, push_weight=0.5).backward()
    assert torch.count_nonzero(v.grad) == 0


def test_meta_embedding_is_gamma_times_direct_plus_selected_memory():
    torch.manual_seed(0)
    head = MetaEmbeddingHead(8, 3, cosine_scale=16.0, reachability_scale=10.0)
    memory = torch.eye(3, 8) * 5
    head.centroids.copy_(memory)
    near = memory[:1] + 0.5
    assert reachability(near, memory).item() == pytest.approx(10 / (0.5 * 8 ** 0.5), rel=1e-4)
    v = torch.randn(4, 8) * 3
    gamma = 10 / torch.cdist(v, memory).min(1).values
    want = gamma[:, None] * (v + torch.tanh(head.selector(v)) * (torch.softmax(head.hallucinator(v), 1) @ memory))
    head.classifier = torch.nn.Identity()  # expose the embedding the classifier sees
    torch.testing.assert_close(head(v), want)  # gamma (official code), not 1/gamma: far samples shrink
    assert head(memory[:1] * 100).norm() < head(near).norm() / 3  # about s far away, ~1/distance near
    clf = CosineNormClassifier(8, 3, scale=16.0)
    assert clf(torch.randn(100, 8) * 1e3).abs().max() <= 16.0 + 1e-4


def test_modulated_attention_starts_as_the_identity():
    torch.manual_seed(0)
    att = ModulatedAttention(6, 3, 3)
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(att(x), x)
    torch.nn.init.normal_(att.conv_mask.weight)
    assert not torch.allclose(att(x), x)
    with pytest.raises(UserError, match="3x3"):
        att(torch.randn(2, 6, 4, 4))


def test_oltr_model_switches_heads_with_the_stage():
    from cmw_transfer.models import create_model

    torch.manual_seed(0)
    model = OLTRModel(create_model(MODEL, 4, 1), 4).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), model.backbone(x))
    model.stage = 2
    logits, dcl = model(x, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 4) and dcl.ndim == 0 and torch.equal(model(x), logits)


# -- open set -----------------------------------------------------------------------------------------------------
def test_open_set_f_measures_follow_their_definitions():
    unknown = 3
    label = np.array([0, 0, 1, 2, 3, 3, 3])
    pred = np.array([0, 3, 1, 1, 3, 0, 2])  # TP 2 (0, 1); FP 2 (rejected 0, 2 as 1); FN 2 (unknowns accepted)
    p, r = 2 / 4, 2 / 4
    assert open_f_measure(pred, label, unknown) == pytest.approx(2 * p * r / (p + r))
    assert open_macro_f1(pred, label, unknown) == pytest.approx(f1_score(label, pred, average="macro"))
    assert calibrated_threshold(np.arange(100.0), 0.95) == 5.0  # accepts 95 of the 100


def test_open_macro_f1_is_sklearn_f1_over_the_classes_present_on_random_cases():
    """Random predictions over known classes + unknown, with classes absent from the labels (predicted or not),
    no unknown sample, only unknowns, a class never predicted: the score is the unweighted mean of
    2TP / (2TP + FP + FN) over the classes present in the labels, which is sklearn's macro F1 on those labels."""
    rng = np.random.default_rng(0)
    for case in range(300):
        num_known = int(rng.integers(1, 8))
        unknown = num_known
        n = int(rng.integers(1, 60))
        present = rng.choice(num_known + 1, size=int(rng.integers(1, num_known + 2)), replace=False)
        if case % 10 == 0:
            present = present[present != unknown] if (present != unknown).any() else present  # no unknowns
        elif case % 10 == 1:
            present = np.array([unknown])  # only unknowns
        label = rng.choice(present, size=n)
        pred = rng.integers(0, num_known + 1, size=n)  # may name classes absent from the labels
        if case % 3 == 0:
            pred = np.where(rng.random(n) < 0.6, label, pred)  # mostly right
        per_class = []
        for c in np.unique(label):
            tp = np.sum((pred == c) & (label == c))
            fp = np.sum((pred == c) & (label != c))
            fn = np.sum((pred != c) & (label == c))
            per_class.append(2 * tp / (2 * tp + fp + fn))
        ours = open_macro_f1(pred, label, unknown)
        assert ours == pytest.approx(float(np.mean(per_class)), abs=1e-12), case
        assert ours == pytest.approx(f1_score(label, pred, labels=np.unique(label), average="macro",
                                              zero_division=0), abs=1e-12)
    assert np.isnan(open_macro_f1(np.array([], dtype=int), np.array([], dtype=int), 3))


def test_reachability_rejects_a_held_out_class_on_synthetic_clusters():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (5, 16)) * 6  # class 4 is never seen in training
    train_y = np.repeat(np.arange(4), 50)
    train_x = means[train_y] + rng.normal(0, 1, (200, 16))
    centroids = torch.tensor(np.stack([train_x[train_y == c].mean(0) for c in range(4)]), dtype=torch.float32)
    test_y = np.repeat(np.arange(5), 40)
    test_x = torch.tensor(means[test_y] + rng.normal(0, 1, (200, 16)), dtype=torch.float32)
    gamma = reachability(test_x, centroids).numpy()
    pred = torch.cdist(test_x, centroids).argmin(1).numpy()  # a nearest-centroid classifier
    label = np.where(test_y == 4, 4, test_y)
    report = open_set_report(pred, label, gamma, 4, calibrated_threshold(gamma[test_y < 4], 0.95))
    assert report["auroc"] > 0.99 and report["unknown_reject"] > 0.9 and report["known_accept"] >= 0.95
    assert report["f1"] > 0.95 and report["n_unknown"] == 40
    closed = open_set_report(pred, label, gamma, 4, threshold=0.0)  # no rejection: every unknown is a miss
    assert closed["unknown_reject"] == 0 and closed["f1"] < report["f1"]


def test_hold_out_classes_renumbers_and_keeps_the_open_class_unseen():
    train = create_dataset("digits", noise="asym:0.4", imbalance=10)  # asym maps 4 -> 9: observed 9s too
    test = create_dataset("digits", split="test")
    new_train, evals, open_ds = hold_out_classes(train, [("test", test)], parse_open_classes("2,9"))
    known = [0, 1, 3, 4, 5, 6, 7, 8]
    keep = np.isin(train.targets, known) & np.isin(train.clean_targets, known)
    assert new_train.num_classes == 8 and len(new_train) == keep.sum()
    np.testing.assert_array_equal(np.array(known)[new_train.targets], train.targets[keep])
    np.testing.assert_array_equal(np.array(known)[new_train.clean_targets], train.clean_targets[keep])
    assert evals[0][1].num_classes == 8 and len(evals[0][1]) == np.isin(test.targets, known).sum()
    assert len(open_ds) == np.isin(test.targets, [2, 9]).sum() and set(open_ds.targets) == {8}
    assert new_train.classes == [str(c) for c in known]
    with pytest.raises(UserError, match="classes 0..9"):
        hold_out_classes(train, [("test", test)], [12])
    with pytest.raises(UserError, match="expected class indices"):
        parse_open_classes("nine")


def test_class_aware_sampler_visits_classes_equally_and_shards_exactly():
    labels = np.repeat(np.arange(4), [100, 30, 8, 2])
    full = ClassAwareSampler(labels, 4, seed=1)
    full.set_epoch(3)
    order = full.order()
    assert len(order) == 140 and list(order) == list(full.order())  # a function of (seed, epoch)
    visits = np.bincount(labels[order], minlength=4)
    assert visits.max() - visits.min() <= 4  # balanced classes, whatever their size
    full.set_epoch(4)
    assert list(full.order()) != list(order)
    padded = ClassAwareSampler(labels, 4, seed=1, world_size=3)  # 140 samples -> 141, a multiple of 3
    padded.set_epoch(3)
    want = padded.order()
    shards = [ClassAwareSampler(labels, 4, seed=1, rank=r, world_size=3) for r in range(3)]
    for rank, shard in enumerate(shards):
        shard.set_epoch(3)
        assert list(shard) == want[rank::3].tolist() and len(shard) == 47


# -- runs ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oltr_run(tmp_path_factory, weights_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("oltr") / "run"
    return out, run_stage(oltr_config(out, weights_dir))


def test_short_two_stage_run_reports_shot_splits_and_open_set(oltr_run):
    out, summary = oltr_run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "classifier.safetensors",
                                                     "classifier_best.safetensors", "config.json", "families.json",
                                                     "metrics.jsonl", "summary.json", "training.png"]
    rows = _rows(out)
    assert [(r["epoch"], r["stage"], r["weighted"]) for r in rows] == [(1, 1, False), (2, 1, True),
                                                                       (3, 2, False), (4, 2, True)]
    assert "train_dcl" not in rows[1] and rows[2]["train_dcl"] > 0  # the centroid loss only in stage 2
    final = summary["final"]
    for key in ("test_top1", "test_many_top1", "test_medium_top1", "test_few_top1", "open_f1", "open_macro_f1",
                "open_auroc", "open_threshold", "open_known_accept", "open_unknown_reject"):
        assert isinstance(final[key], float), key
    assert final["test_many_n"] and final["test_medium_n"] and final["test_few_n"]
    assert final["open_n_unknown"] == 45 and final["open_n_known"] == final["test_n"] == 405
    assert final["open_known_accept"] >= 0.95  # the default threshold accepts 95% of the known test samples
    assert summary["trainer"] == "oltr" and summary["epochs"] == 4
    assert final["test_top1"] > 30  # learns something in four short epochs
    fam = json.loads((out / "families.json").read_text())
    assert len(fam["family_of_class"]) == 9  # families of the 9 known classes
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["stage"] == 2 and state["model"]["head.centroids"].shape == (9, 96)
    assert "attention.fc_spatial.weight" in state["model"]  # CNN map: modulated attention on by default


def test_stage1_is_the_erm_run_and_the_memory_its_class_means(oltr_run, tmp_path, weights_dir):
    """Stage 1 reuses the ERM trainer: same weights as an ERM run of as many epochs; the stage-2 memory starts as
    the class means of that model's training features (the attention starts as the identity)."""
    from cmw_transfer.models import create_model

    out, _ = oltr_run
    erm_out = tmp_path / "erm"
    run_stage(oltr_config(erm_out, weights_dir, trainer="erm"))
    erm_rows, rows = _rows(erm_out), _rows(out)
    for key in ("train_loss", "test_top1", "test_few_top1", "open_f1", "open_auroc"):
        assert erm_rows[1][key] == rows[1][key], key
    model = create_model(MODEL, 9, 1)
    model.load_state_dict(torch.load(erm_out / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    cfg = oltr_config(out, weights_dir)
    train, _, _ = hold_out_classes(create_dataset("digits", imbalance=10),
                                   [("test", create_dataset("digits", split="test"))], [9])
    loader = make_loader(train_eval_view(train, cfg), 64, train=False, workers=0, seed=0, distributed=False)
    want, _ = class_centroids(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), loader,
                              CPU, 9)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(state["model"]["head.centroids"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kill_at", ["3:1", "4:2"])  # crash in the first stage-2 epoch / mid stage 2
def test_resume_continues_either_stage_exactly(kill_at, oltr_run, tmp_path, weights_dir):
    ref_out, reference = oltr_run

    class CrashError(Exception):
        pass

    out = tmp_path / "crashed"
    epoch, step = (int(part) for part in kill_at.split(":"))
    with crash_at(epoch, step, CrashError), pytest.raises(CrashError):
        run_stage(oltr_config(out, weights_dir))
    done = int(kill_at.split(":")[0]) - 1
    assert [r["epoch"] for r in _rows(out)] == list(range(1, done + 1))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["stage"] == (1 if done == 2 else 2)
    resumed = run_stage(oltr_config(out, weights_dir, resume=True))
    assert resumed["final"] == reference["final"]
    strip = [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(out)]
    assert strip == [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(ref_out)]
    got = torch.load(out / "checkpoint.pt", weights_only=True)
    want = torch.load(ref_out / "checkpoint.pt", weights_only=True)
    for key, tensor in want["model"].items():
        assert torch.equal(got["model"][key], tensor), key


def test_a_distrusted_net_is_not_applied_in_either_oltr_stage(tmp_path, weights_dir):
    """The trust check's fallback holds through both stages, also with a fixed warm-up per stage."""
    summary = run_stage(oltr_config(tmp_path / "oltr", weights_dir, trust_check="fallback"))
    assert summary["trust"]["verdict"] == "distrust" and summary["trust"]["action"] == "fallback"
    assert not any(row["weighted"] for row in _rows(tmp_path / "oltr"))


def test_erm_trainer_evaluates_the_open_set_too(tmp_path):
    summary = run_stage(oltr_config(tmp_path / "erm", None, trainer="erm", weighting="none", epochs=1,
                                    open_threshold=0.5))
    final = summary["final"]
    assert final["open_threshold"] == 0.5 and final["open_n_unknown"] == 45 and 0 <= final["open_f1"] <= 1


# -- configuration ------------------------------------------------------------------------------------------------
def test_fingerprints_keep_erm_runs_resumable_and_separate_oltr_settings(tmp_path):
    erm = ApplyConfig(dataset="digits", out=str(tmp_path))
    old_fields = {k: v for k, v in erm.to_dict().items()
                  if k not in (*OLTR_FIELDS, *EQL_FIELDS, "trainer", "open_dataset", "open_classes", "open_threshold",
                               "open_accept", "curves", "trust_check")}
    assert erm.fingerprint() == config_fingerprint(old_fields, ignore=RESUME_FREE)  # as before OLTR existed
    assert ApplyConfig(dataset="digits", out=str(tmp_path), dcl_weight=0.5).fingerprint() == erm.fingerprint()
    assert ApplyConfig(dataset="digits", out=str(tmp_path), open_classes=(9,)).fingerprint() != erm.fingerprint()
    oltr = ApplyConfig(dataset="digits", out=str(tmp_path), trainer="oltr")
    assert oltr.fingerprint() != erm.fingerprint()
    assert ApplyConfig(dataset="digits", out=str(tmp_path), trainer="oltr", dcl_weight=0.5).fingerprint() \
        != oltr.fingerprint()
    assert ApplyConfig(dataset="digits", out=str(tmp_path), trainer="oltr", open_threshold=0.3).fingerprint() \
        == oltr.fingerprint()  # evaluation only
    assert oltr.stage_epochs() == (30, 30) and oltr.total_epochs() == 60


def _cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["apply", "--no-progress", "--workers", "0", *args])
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra, expect", [
    (["--soft-labels"], "--soft-labels"),
    (["--open-classes", "12"], "classes 0..9"),
    (["--open-classes", "x"], "class indices"),
    (["--open-classes", "9", "--open-dataset", "digits"], "pick one"),
    (["--dcl-weight", "-1"], "--dcl-weight"),
    (["--oltr-stage2-epochs", "0"], "--oltr-stage2-epochs"),
    (["--open-accept", "0"], "--open-accept"),
    (["--oltr-sampler", "sometimes"], "--oltr-sampler"),
])
def test_bad_oltr_input_is_one_error_line_and_writes_nothing(extra, expect, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(capsys, "--trainer", "oltr", "--weighting", "none", "--dataset", "digits", "--model", MODEL,
                     "--epochs", "1", "--out", str(out), *extra)
    assert code == 2 and err.startswith("error: ") and expect in err and err.count("\n") == 1, err
    assert not out.exists()


def test_relaunch_keeps_oltr_options_and_leaves_the_auto_attention_alone():
    from cmw_transfer.cli.apply_cmd import _relaunch_argv, apply_cmd

    base = ["--dataset", "digits", "--out", "o", "--trainer", "oltr", "--open-classes", "7,9", "--dcl-weight", "0.1"]
    tail = _relaunch_argv(apply_cmd.make_context("apply", list(base)), 2)  # click consumes the list
    assert "--modulated-attention" not in tail and "--no-modulated-attention" not in tail
    assert tail[tail.index("--open-classes") + 1] == "7,9" and tail[tail.index("--trainer") + 1] == "oltr"
    tail = _relaunch_argv(apply_cmd.make_context("apply", [*base, "--no-modulated-attention"]), 2)
    assert "--no-modulated-attention" in tail


# -- ImageNet-LT's open split -------------------------------------------------------------------------------------
def test_imagenet_lt_open_list_is_the_open_set(tmp_path):
    from cmw_transfer.models import create_model
    from cmw_transfer.trainer.apply.openset import evaluate_open_set
    from cmw_transfer.trainer.apply.setup import build_setup as _setup
    from tests.fixtures_data import write_imagenet_lt, write_png

    rows = write_imagenet_lt(tmp_path)
    for k, (path, _) in enumerate(rows["open"]):
        write_png(tmp_path / path, 40 * k)
    for k, (path, _) in enumerate(rows["test"][:6]):
        write_png(tmp_path / path, 20 * k)
    cfg = ApplyConfig(dataset="imagenet-lt", data_root=str(tmp_path), out=str(tmp_path / "out"), model=MODEL,
                      img_size=16, weighting="none", batch_size=32, workers=0, progress=False)
    with pytest.warns(UserWarning, match="unreadable"):
        setup = _setup(cfg, CPU)  # found ImageNet_LT_open.txt: open-set evaluation on
        assert setup.open_ds is not None and len(setup.open_ds) == 4 and set(setup.open_ds.targets) == {1000}
        explicit = _setup(ApplyConfig(**{**cfg.to_dict(), "open_dataset": "imagenet-lt"}), CPU)
        assert explicit.open_ds.targets.tolist() == setup.open_ds.targets.tolist()
        torch.manual_seed(0)
        model = create_model(MODEL, 1000, 3)
        report = evaluate_open_set(model, setup.eval_loaders[0][1], setup.open_loader, torch.randn(1000, 96),
                                   setup.counts, CPU, cfg)
    assert report["n_unknown"] == 4 and report["n_known"] == 6  # unreadable test images are skipped
    assert 0 <= report["f1"] <= 1 and 0 <= report["auroc"] <= 1
    os.remove(tmp_path / "ImageNet_LT" / "ImageNet_LT_open.txt")
    assert _setup(cfg, CPU).open_ds is None  # no open list: closed-set evaluation only

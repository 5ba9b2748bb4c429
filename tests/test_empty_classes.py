"""Training on real lists that leave classes empty: one warning, families and shot splits without those classes.

A 5,000-line sample of WebVision's 1,000 classes leaves dozens of classes without a line. ``data`` reports them;
``apply`` and ``metatrain`` warn once and train: the class-size families are fitted on the classes with samples,
an empty class takes the head of the smallest family present, it joins no many/medium/few-shot split, and an
evaluation class without samples has a per-class accuracy of null (strict JSON). A malformed list is still refused.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from cmw_transfer.artifact.scales import DegenerateScalesWarning, fit_families
from cmw_transfer.dataset import create_dataset, split_per_class
from cmw_transfer.metrics.accuracy import shot_masks, shot_split_accuracy
from cmw_transfer.weighting.baselines import ClassBalancedWeighting
from tests.fixtures_data import write_png, write_webvision
from tests.helpers import call_main

EMPTY = (3, 17)  # mini-webvision classes without a training line
VAL_MISSING = 5  # a class with training samples but none in the val list


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def webvision_with_holes(tmp_path_factory):
    """The WebVision 1.0 layout (mini-webvision's 50 classes have images) with classes 3 and 17 left out of the
    training lists, class 5 out of the val list, and classes 0-9 larger than the rest (two class sizes)."""
    root = tmp_path_factory.mktemp("webvision")
    rows = write_webvision(root, google_per_class=6, flickr_per_class=0)
    google = [(p, c) for p, c in rows["google"] if c not in EMPTY and (c < 10 or not p.endswith(("_4.jpg", "_5.jpg")))]
    val = [(p, c) for p, c in rows["val"] if c != VAL_MISSING]
    (root / "info" / "train_filelist_google.txt").write_text("".join(f"{p} {c}\n" for p, c in google))
    (root / "info" / "val_filelist.txt").write_text("".join(f"{p} {c}\n" for p, c in val))
    for path, c in google:
        if c < 50:
            write_png(root / path, 20 + 4 * c)
    for path, c in val:
        if c < 50:
            write_png(root / "val_images_256" / path, 20 + 4 * c)
    return root


# -- the pieces ---------------------------------------------------------------------------------------------------
def _quiet_fit(counts, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateScalesWarning)
        return fit_families(counts, k)


def test_families_ignore_empty_classes_and_give_them_the_smallest_present_head():
    rng = np.random.default_rng(0)
    for _ in range(30):
        present = rng.integers(1, 500, size=rng.integers(2, 40))
        counts = present.copy()
        for _ in range(rng.integers(1, 6)):  # zeros anywhere, the others in the same order
            counts = np.insert(counts, rng.integers(0, counts.size + 1), 0)
        k = int(rng.integers(1, 5))
        ref_centers, ref_family = _quiet_fit(present, k)
        centers, family = _quiet_fit(counts, k)
        assert np.array_equal(centers, ref_centers)
        assert np.array_equal(family[counts > 0], ref_family)
        assert (family[counts == 0] == ref_family.min()).all()
    with pytest.raises(ValueError, match="count of 0"):
        fit_families(np.zeros(4), 3)


def test_a_class_without_training_samples_is_in_no_shot_split():
    counts = np.array([0, 5, 50, 500, 0])
    masks = shot_masks(counts)
    assert [name for c in (0, 4) for name, m in masks.items() if m[c]] == []
    assert masks["few"].tolist() == [False, True, False, False, False]
    correct = np.array([1, 1, 0, 1, 0, 1], dtype=float)
    targets = np.array([0, 1, 1, 2, 3, 4])  # eval samples of classes 0 and 4 count in no split
    acc = shot_split_accuracy(correct, targets, counts)
    assert acc == {"many": 0.0, "medium": 1.0, "few": 0.5}


def test_class_balanced_weights_are_those_of_the_classes_with_samples():
    full = ClassBalancedWeighting([0, 10, 100, 0, 1000], beta=0.99).class_weight
    ref = ClassBalancedWeighting([10, 100, 1000], beta=0.99).class_weight
    assert np.allclose(full[[1, 2, 4]].numpy(), ref.numpy())
    assert np.isfinite(full.numpy()).all() and abs(float(full[[1, 2, 4]].mean()) - 1.0) < 1e-6


def test_a_held_out_meta_set_skips_empty_classes(webvision_with_holes):
    ds = create_dataset("mini-webvision", webvision_with_holes, allow_empty_classes=True)
    rest, held = split_per_class(ds, 2)
    assert np.bincount(held.targets, minlength=50).tolist() == [0 if c in EMPTY else 2 for c in range(50)]
    assert len(rest) + len(held) == len(ds)


# -- through the CLI ----------------------------------------------------------------------------------------------
def test_apply_warns_once_and_trains_on_a_list_with_empty_classes(webvision_with_holes, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call_main(["apply", "--dataset", "mini-webvision", "--data-dir", str(webvision_with_holes),
                                   "--weights", "pretrained:cmwnet-digits-pmd", "--model", "small_cnn",
                                   "--epochs", "1", "--img-size", "16", "--workers", "0", "--no-progress",
                                   "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    train_warning = [line for line in err.splitlines() if "--dataset mini-webvision: " in line]
    assert train_warning == ["warning: --dataset mini-webvision: 2 of 50 classes have no samples (class 3, 17); "
                             "training goes on without them (they join no class-size family and no shot split)"]
    assert "evaluation set 'test': 1 of 50 classes have no samples (class 5); their per-class accuracy is null" in err
    families = _strict((out / "families.json").read_text())
    counts = np.asarray(families["class_counts"])
    assert families["empty_classes"] == list(EMPTY) and (counts[list(EMPTY)] == 0).all()
    present_heads = {families["head_of_class"][c] for c in range(50) if c not in EMPTY}
    assert {families["head_of_class"][c] for c in EMPTY} == {min(present_heads)}
    assert sum(families["classes_per_head"]) == 48
    ref_centers, _ = _quiet_fit(counts[counts > 0], 3)
    assert np.allclose(families["centers"], ref_centers)
    summary = _strict((out / "summary.json").read_text())
    per_class = summary["test_per_class_top1"]
    assert per_class[VAL_MISSING] is None and all(v is not None for c, v in enumerate(per_class) if c != VAL_MISSING)
    assert summary["worst_class"]["class"] not in EMPTY  # never-seen classes are not "the worst class"
    final = summary["final"]
    assert final["test_n"] == 49  # the val list: 50 classes less class 5
    assert final["test_many_n"] + final["test_medium_n"] + final["test_few_n"] == 49 - len(EMPTY)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_metatrain_warns_once_and_fits_families_without_empty_classes(webvision_with_holes, tmp_path, capsys,
                                                                    monkeypatch):
    import cmw_transfer.dataset.images as images

    small = images.make_transform  # metatrain reads file images at the default 224 px: 16 px keeps this fast
    monkeypatch.setattr(images, "default_transform", lambda split="train", input_size=16: small(split, 16))
    out = tmp_path / "meta"
    code, stdout, err = call_main(["metatrain", "--src", "mini-webvision", "--data-dir", str(webvision_with_holes),
                                   "--epochs", "1", "--warmup-epochs", "0", "--meta-set", "clean:1",
                                   "--workers", "0", "--device", "cpu", "--quiet", "--json", "--out", str(out)], capsys)
    assert code == 0, err
    assert err.count("2 of 50 classes have no samples (class 3, 17)") == 1
    run = _strict((out / "run.json").read_text())
    counts = np.asarray(run["class_counts"])
    assert (counts[list(EMPTY)] == 0).all()
    ref_centers, ref_family = _quiet_fit(counts[counts > 0], 3)
    assert np.allclose(run["centers"], ref_centers)
    family = np.asarray(run["family_of_class"])
    assert np.array_equal(family[counts > 0], ref_family) and (family[list(EMPTY)] == ref_family.min()).all()
    assert (out / "model.safetensors").is_file()
    _strict(stdout)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict(line)


@pytest.mark.parametrize(("line", "match"), [("b.png x", "malformed"), ("b.png -1", "-1"),
                                             ("b.png 999999999999999999", "out of range")])
def test_a_malformed_list_is_still_refused_in_one_line(tmp_path, capsys, line, match):
    write_png(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text(f"a.png 0\n{line}\n")
    out = tmp_path / "run"
    code, _, err = call_main(["apply", "--dataset", f"list:{tmp_path / 'l.txt'}", "--eval-dataset",
                              f"list:{tmp_path / 'l.txt'}", "--weighting", "none", "--epochs", "1",
                              "--workers", "0", "--no-progress", "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert not out.exists()

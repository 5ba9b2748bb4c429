"""LabeledDataset behaviour: digits, views, per-class splits, transforms and unreadable images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cmw_transfer.dataset import (
    create_dataset,
    default_transform,
    skip_unreadable_collate,
    skipped_in_collate,
    split_per_class,
)
from cmw_transfer.dataset.images import make_transform
from cmw_transfer.errors import UserError
from tests.fixtures_data import write_broken_image, write_png


def test_digits_splits_are_disjoint_stable_and_stratified():
    train, test = create_dataset("digits", split="train"), create_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    assert np.array_equal(create_dataset("digits").targets, train.targets)
    counts = train.class_counts()
    assert counts.min() >= 131 and counts.max() <= 137  # stratified 75%
    x, label, index = train[5]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    assert label == train.targets[5] and index == 5
    assert np.array_equal(train.clean_targets, train.targets)


def test_digits_train_and_test_samples_differ():
    from sklearn.datasets import load_digits

    images = load_digits().images.reshape(1797, -1)
    key = {row.tobytes(): k for k, row in enumerate(images)}
    train, test = create_dataset("digits", split="train"), create_dataset("digits", split="test")
    ids = [{key[(x[0] * 16).round().reshape(-1).astype(np.float64).tobytes()] for x in ds.data} for ds in (train, test)]
    assert len(ids[0] | ids[1]) >= 1790 and len(ids[0] & ids[1]) <= 5  # disjoint up to duplicate images


def test_subset_and_with_targets_keep_alignment():
    ds = create_dataset("digits")
    sub = ds.subset([10, 3, 7])
    assert sub.targets.tolist() == ds.targets[[10, 3, 7]].tolist()
    assert torch.equal(sub[1][0], ds[3][0]) and sub[1][2] == 1
    noisy = sub.with_targets([0, 0, 0])
    assert noisy.targets.tolist() == [0, 0, 0] and np.array_equal(noisy.clean_targets, sub.clean_targets)
    assert noisy.noise_rate() == pytest.approx(np.mean(sub.clean_targets != 0))
    assert ds.targets[10] == sub.targets[0]  # the original is untouched
    with pytest.raises(UserError, match="outside 0..9"):
        sub.with_targets([0, 0, 12])
    with pytest.raises(UserError, match="3 samples"):
        sub.with_targets([0, 0])
    assert noisy.subset([2]).subset([0]).rows.tolist() == [ds.rows[7]]


def test_split_per_class_gives_a_balanced_held_out_set():
    ds = create_dataset("digits")
    rest, held = split_per_class(ds, 10, seed=3)
    assert held.class_counts().tolist() == [10] * 10
    assert len(rest) + len(held) == len(ds)
    assert np.intersect1d(rest.rows, held.rows).size == 0
    again = split_per_class(ds, 10, seed=3)[1]
    assert np.array_equal(again.rows, held.rows)
    with pytest.raises(UserError, match="fewer than the 500 per class"):
        split_per_class(ds, 500)


def test_in_memory_transform_gets_a_pil_image():
    ds = create_dataset("digits", transform=make_transform("test", input_size=16))
    x, _, _ = ds[0]
    assert x.shape == (3, 16, 16)


def test_default_timm_transform_decodes_files(tmp_path):
    write_png(tmp_path / "a" / "x.png", 200, size=40)
    (tmp_path / "l.txt").write_text("a/x.png 0\n")
    ds = create_dataset(f"list:{tmp_path / 'l.txt'}", split="test")
    assert ds[0][0].shape == (3, 224, 224)
    assert default_transform("test") is default_transform("test")


def _broken_list(tmp_path):
    write_png(tmp_path / "ok0.png")
    write_png(tmp_path / "ok1.png")
    write_broken_image(tmp_path / "bad.png")
    (tmp_path / "l.txt").write_text("ok0.png 0\nbad.png 1\nok1.png 1\n")
    return f"list:{tmp_path / 'l.txt'}"


def test_unreadable_image_is_skipped_counted_and_reported(tmp_path):
    spec = _broken_list(tmp_path)
    ds = create_dataset(spec, transform=make_transform("test", input_size=8))
    skipped_in_collate(reset=True)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*bad\.png"):
        batches = list(DataLoader(ds, batch_size=3, collate_fn=skip_unreadable_collate))
    (x, y, idx), = batches
    assert x.shape == (2, 3, 8, 8) and idx.tolist() == [0, 2] and y.tolist() == [0, 1]
    assert ds.unreadable_count() == 1 and skipped_in_collate() == 1
    empty = skip_unreadable_collate([(None, 1, 1)])
    assert empty[0].numel() == 0 and empty[2].dtype == torch.long


def test_unreadable_count_is_shared_across_dataloader_workers(tmp_path):
    ds = create_dataset(_broken_list(tmp_path), transform=make_transform("test", input_size=8))
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=skip_unreadable_collate)
    kept = sum(len(idx) for _, _, idx in loader)
    assert kept == 2 and ds.unreadable_count() == 1
    clone = pickle.loads(pickle.dumps(ds))  # plain pickling works and keeps the count
    assert clone.unreadable_count() == 1


def test_strict_turns_an_unreadable_image_into_an_error(tmp_path):
    ds = create_dataset(_broken_list(tmp_path), strict=True, transform=make_transform("test", input_size=8))
    with pytest.raises(UserError, match=r"cannot read image .*bad\.png.*--strict"):
        ds[1]


def test_eta_knn_needs_in_memory_data(tmp_path):
    from cmw_transfer.bias import estimate_eta

    with pytest.raises(UserError, match="in-memory"):
        estimate_eta(create_dataset(_broken_list(tmp_path)), method="knn")

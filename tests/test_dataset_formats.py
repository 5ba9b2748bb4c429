"""Each on-disk format, read from a small fixture written in exactly that format; plus its bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmw_transfer.dataset import create_dataset
from cmw_transfer.dataset.images import make_transform
from cmw_transfer.dataset.lists import parse_label_list
from cmw_transfer.errors import UserError
from tests.fixtures_data import (
    write_animal10n,
    write_cifar10,
    write_cifar100,
    write_clothing1m,
    write_imagenet_lt,
    write_png,
    write_webvision,
)

SMALL = make_transform("test", input_size=16)


# --- list parsing ------------------------------------------------------------------------------------
def test_list_parser_handles_crlf_blank_lines_spaces_in_paths(tmp_path):
    src = tmp_path / "l.txt"
    src.write_bytes(b"a/b.jpg 3\r\n\r\n  my dir/c d.jpg   12  \r\nx.png\t0\n\n")
    parsed = parse_label_list(src, tmp_path)
    assert parsed.labels.tolist() == [3, 12, 0]
    assert parsed.line_numbers.tolist() == [1, 3, 4]
    assert [parsed.paths.relative(k) for k in range(3)] == ["a/b.jpg", "my dir/c d.jpg", "x.png"]
    assert parsed.paths[1] == tmp_path / "my dir" / "c d.jpg"


@pytest.mark.parametrize(("content", "line"), [
    ("a.jpg 1\nb.jpg\n", 2),
    ("a.jpg 1\n\nb.jpg x1\n", 3),
    ("a.jpg 1.5\n", 1),
    ("7\n", 1),
])
def test_malformed_list_line_names_file_and_line(tmp_path, content, line):
    src = tmp_path / "bad.txt"
    src.write_text(content)
    with pytest.raises(UserError, match=rf"bad\.txt:{line}: malformed line"):
        parse_label_list(src, tmp_path)


def test_out_of_range_label_names_file_and_line(tmp_path):
    src = tmp_path / "l.txt"
    src.write_text("a.jpg 0\nb.jpg -1\n")
    with pytest.raises(UserError, match=r"l\.txt:2: label -1 is out of range"):
        parse_label_list(src, tmp_path)
    src.write_text("a.jpg 0\nb.jpg 4\nc.jpg 9\n")
    with pytest.raises(UserError, match=r"l\.txt:3: label 9 is out of range \(allowed 0\.\.4"):
        parse_label_list(src, tmp_path, num_classes=5)


# --- CIFAR -------------------------------------------------------------------------------------------
def test_cifar10_pickle_batches(tmp_path):
    info = write_cifar10(tmp_path)
    train = create_dataset("cifar10", tmp_path, "train", download=False)
    test = create_dataset("cifar10", tmp_path, "test", download=False)
    assert len(train) == 100 and len(test) == 10
    assert train.targets.tolist() == info["train_labels"]
    assert np.array_equal(train.clean_targets, train.targets)
    assert train.classes[9] == "truck" and train.input_shape == (3, 32, 32)
    x, label, index = test[3]
    expected = info["test_data"][3].reshape(3, 32, 32).astype(np.float32) / 255.0  # R, G, B planes
    assert torch.allclose(x, torch.from_numpy(expected)) and label == 3 and index == 3
    # root may also be the batches folder itself
    assert len(create_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test", download=False)) == 10


def test_cifar100_pickle_files(tmp_path):
    info = write_cifar100(tmp_path)
    ds = create_dataset("cifar100", tmp_path, "train", download=False)
    assert ds.num_classes == 100 and ds.targets.tolist() == info["train_labels"]
    assert ds.classes[5] == "fine5"
    noisy = create_dataset("cifar100", tmp_path, "train", download=False, noise="asym:0.4", seed=1)
    changed = noisy.targets != noisy.clean_targets
    from cmw_transfer.bias.maps import CIFAR100_COARSE

    assert changed.any() and np.all(CIFAR100_COARSE[noisy.targets] == CIFAR100_COARSE[noisy.clean_targets])


def test_cifar_missing_files_error_names_files_and_data_dir(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"data_batch_1.*--data-dir") as exc:
        create_dataset("cifar10", tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py" / "batches.meta") in str(exc.value)
    from cmw_transfer.dataset.formats import cifar

    monkeypatch.setattr(cifar, "_download", lambda name, root: "URLError: no network")
    with pytest.raises(UserError, match=r"download failed \(URLError: no network\).*cifar-100-python"):
        create_dataset("cifar100", tmp_path)


def test_corrupt_cifar_batch_is_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR python-pickle batch"):
        create_dataset("cifar10", tmp_path, download=False)


# --- WebVision ---------------------------------------------------------------------------------------
def test_webvision_full_and_mini(tmp_path):
    rows = write_webvision(tmp_path)
    full = create_dataset("webvision-full", tmp_path, "train", transform=SMALL)
    assert len(full) == 3000 and full.num_classes == 1000 and full.clean_targets is None
    assert full.class_counts().tolist() == [3] * 1000
    assert full.path(0) == tmp_path / rows["google"][0][0]
    assert full.path(2000) == tmp_path / rows["flickr"][0][0]
    x, label, _ = full[0]
    assert x.shape == (3, 16, 16) and label == 0
    mini = create_dataset("mini-webvision", tmp_path, "train")
    assert len(mini) == 100 and mini.num_classes == 50
    assert all(mini.path(k).parts[-3] == "google" for k in range(len(mini)))
    val = create_dataset("mini-webvision", tmp_path, "val", transform=SMALL)
    assert len(val) == 50 and val.path(0) == tmp_path / "val_images_256" / rows["val"][0][0]
    assert val[0][0].shape == (3, 16, 16)


def test_webvision_missing_lists_and_empty_classes(tmp_path):
    with pytest.raises(UserError, match=r"info/train_filelist_google\.txt.*info/train_filelist_flickr\.txt"):
        create_dataset("webvision-full", tmp_path)
    with pytest.raises(UserError, match="needs --data-dir"):
        create_dataset("webvision-full", None)
    write_webvision(tmp_path)
    lines = (tmp_path / "info" / "train_filelist_flickr.txt").read_text().splitlines()
    (tmp_path / "info" / "train_filelist_flickr.txt").write_text("\n".join([*lines[:5], "bad line here"]))
    with pytest.raises(UserError, match=r"train_filelist_flickr\.txt:6: malformed line 'bad line here'"):
        create_dataset("webvision-full", tmp_path)
    google = (tmp_path / "info" / "train_filelist_google.txt").read_text().splitlines()
    (tmp_path / "info" / "train_filelist_google.txt").write_text("\n".join(g for g in google if not g.endswith(" 7")))
    with pytest.raises(UserError, match=r"1 of 50 classes have no samples \(class 7\)"):
        create_dataset("mini-webvision", tmp_path)
    (tmp_path / "info" / "val_filelist.txt").write_text("a.jpg 1000\n")
    with pytest.raises(UserError, match=r"val_filelist\.txt:1: label 1000 is out of range"):
        create_dataset("webvision-full", tmp_path, "val")
    with pytest.raises(UserError, match="splits train, val"):
        create_dataset("webvision-full", tmp_path, "holdout")


# --- ImageNet-LT -------------------------------------------------------------------------------------
def test_imagenet_lt_lists(tmp_path):
    rows = write_imagenet_lt(tmp_path)
    train = create_dataset("imagenet-lt", tmp_path, "train", transform=SMALL)
    counts = train.class_counts()
    assert len(train) == len(rows["train"]) and counts[0] == 5 and counts[1] == 1
    assert train.path(0) == tmp_path / rows["train"][0][0]
    assert train[0][0].shape == (3, 16, 16)
    assert len(create_dataset("imagenet-lt", tmp_path, "val")) == 1000
    assert create_dataset("imagenet-lt", tmp_path, "test").path(0).name == "ILSVRC2012_val_00005000.JPEG"
    opened = create_dataset("imagenet-lt", tmp_path, "open")
    assert opened.num_classes == 1001 and opened.targets.tolist() == [1000] * 4


def test_imagenet_lt_lists_at_root_and_missing(tmp_path):
    write_imagenet_lt(tmp_path / "a", in_subfolder=False)
    assert len(create_dataset("imagenet-lt", tmp_path / "a", "val")) == 1000
    with pytest.raises(UserError, match=r"ImageNet_LT_train\.txt.*--data-dir"):
        create_dataset("imagenet-lt", tmp_path / "b")


# --- Clothing1M --------------------------------------------------------------------------------------
def test_clothing1m_key_and_label_lists(tmp_path):
    rows = write_clothing1m(tmp_path)
    train = create_dataset("clothing1m", tmp_path, "train", transform=SMALL)
    assert len(train) == 42 and train.num_classes == 14
    assert train.targets.tolist() == [label for _, label in rows["noisy"]]
    assert train.path(0) == tmp_path / rows["noisy"][0][0] and train[0][0].shape == (3, 16, 16)
    for split, offset in (("clean-train", 0), ("val", 1), ("test", 2)):
        ds = create_dataset("clothing1m", tmp_path, split)
        assert ds.targets.tolist() == [label for _, label in rows["clean"][offset::3]]


def test_clothing1m_key_without_label_and_missing_files(tmp_path):
    write_clothing1m(tmp_path)
    with open(tmp_path / "clean_val_key_list.txt", "a") as fh:
        fh.write("images/9/99/unknown.jpg\n")
    with pytest.raises(UserError, match=r"clean_val_key_list\.txt:15: key 'images/9/99/unknown\.jpg' has no label"):
        create_dataset("clothing1m", tmp_path, "val")
    (tmp_path / "noisy_label_kv.txt").unlink()
    with pytest.raises(UserError, match=r"noisy_label_kv\.txt \(missing\)"):
        create_dataset("clothing1m", tmp_path, "train")


# --- Animal-10N, folder:, list: ----------------------------------------------------------------------
def test_animal10n_label_in_file_name(tmp_path):
    rows = write_animal10n(tmp_path)
    train = create_dataset("animal-10n", tmp_path, "train", transform=SMALL)
    assert sorted(train.targets.tolist()) == sorted(rows["training"]) and len(train) == 30
    assert all(train.path(k).name.startswith(f"{train.targets[k]}_") for k in range(len(train)))
    x, label, _ = train[4]
    assert x.shape == (3, 16, 16) and label == train.targets[4]
    assert len(create_dataset("animal-10n", tmp_path, "test")) == 10
    write_png(tmp_path / "testing" / "cat_001.jpg")
    with pytest.raises(UserError, match=r"cat_001\.jpg does not follow <label>_<id>\.jpg"):
        create_dataset("animal-10n", tmp_path, "test")
    with pytest.raises(UserError, match=r"training.*missing"):
        create_dataset("animal-10n", tmp_path / "nowhere")


def test_folder_dataset(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for k in range(n):
            write_png(tmp_path / "imgs" / cls / f"{k}.png", 50 * k)
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    ds = create_dataset(f"folder:{tmp_path / 'imgs'}", transform=SMALL)
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 0, 1, 1, 1]
    assert ds[4][0].shape == (3, 16, 16)
    (tmp_path / "imgs" / "emu").mkdir()
    with pytest.raises(UserError, match=r"class folder .*emu holds no images"):
        create_dataset(f"folder:{tmp_path / 'imgs'}")
    with pytest.raises(UserError, match="is not a folder"):
        create_dataset(f"folder:{tmp_path / 'nothing'}")


def test_list_dataset(tmp_path):
    write_png(tmp_path / "a" / "x.png")
    (tmp_path / "train.txt").write_text("a/x.png 1\na/y.png 0\na/x.png 2\n")
    ds = create_dataset(f"list:{tmp_path / 'train.txt'}", transform=SMALL)
    assert ds.num_classes == 3 and ds.class_counts().tolist() == [1, 1, 1]
    assert ds.path(0) == tmp_path / "a" / "x.png" and ds[0][0].shape == (3, 16, 16)
    other = create_dataset(f"list:{tmp_path / 'train.txt'}", root=tmp_path / "a")
    assert other.path(0) == tmp_path / "a" / "a" / "x.png"  # --data-dir overrides the base folder
    (tmp_path / "gap.txt").write_text("a/x.png 0\na/x.png 2\n")
    with pytest.raises(UserError, match=r"1 of 3 classes have no samples \(class 1\)"):
        create_dataset(f"list:{tmp_path / 'gap.txt'}")
    with pytest.raises(UserError, match="list file .*missing.txt not found"):
        create_dataset(f"list:{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no 'relative/path label' lines"):
        create_dataset(f"list:{tmp_path / 'empty.txt'}")


def test_unknown_split_names_the_known_ones():
    with pytest.raises(UserError, match="digits has splits train, test"):
        create_dataset("digits", split="val")

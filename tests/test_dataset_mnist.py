"""The MNIST idx format (Fashion-MNIST, MNIST, KMNIST): parsing, where the files are looked for, every bad file.

Synthetic idx files written byte by byte test the parser everywhere; the tests marked ``real_data`` run on the real
Fashion-MNIST files (and on truncated or altered copies of them in tmp_path) and skip without them.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmw_transfer.dataset import create_dataset
from cmw_transfer.dataset.formats import mnist
from cmw_transfer.errors import UserError
from tests.helpers import call_main, run_cli

FASHION_TRAIN_DIGEST = "33b465d1c3c028c0"  # the clean train labels of the original files


def idx_bytes(values: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None) -> bytes:
    values = np.asarray(values, dtype=np.uint8)
    dims = values.shape if dims is None else dims
    magic = (0x0800 | values.ndim) if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + values.tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, *, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, data in zip(mnist.FILES[split], (images, labels), strict=True):
        raw = idx_bytes(data)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)


def tiny(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def write_all(folder: Path, gz: bool = True, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    images, labels = tiny(n)
    write_split(folder, "train", images, labels, gz=gz)
    write_split(folder, "test", images[:10], labels[:10], gz=gz)
    return images, labels


@pytest.fixture
def no_env(monkeypatch):
    """No CMW_DATA_DIR and no system folder: only the folders a test names are searched."""
    monkeypatch.delenv("CMW_DATA_DIR", raising=False)
    monkeypatch.setitem(mnist.LAYOUTS, "fashion-mnist", mnist.Layout("FashionMNIST", mnist.LAYOUTS["fashion-mnist"]
                                                                      .classes, None))


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip_gzipped_or_raw(tmp_path, no_env, gz):
    images, labels = write_all(tmp_path, gz=gz)
    ds = create_dataset("fashion-mnist", tmp_path)
    assert ds.data.dtype == np.uint8 and ds.data.shape == (12, 28, 28, 1) and ds.input_shape == (1, 28, 28)
    assert ds.targets.tolist() == labels.tolist() and ds.clean_targets.tolist() == labels.tolist()
    x, y, i = ds[5]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and (y, i) == (5, 5)
    assert torch.equal(x[0], torch.from_numpy(images[5]).float() / 255.0)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert len(create_dataset("fashion-mnist", tmp_path, "test")) == 10


def test_views_share_the_uint8_store(tmp_path, no_env):
    write_all(tmp_path, n=100)
    ds = create_dataset("fashion-mnist", tmp_path, noise="sym:0.5", imbalance=2)
    base = create_dataset("fashion-mnist", tmp_path)
    assert len(ds) < 100 and ds.data.shape == (100, 28, 28, 1) and ds.data.dtype == np.uint8
    assert ds.subset([0, 1]).data is ds.data
    assert torch.equal(ds[0][0], base[int(ds.rows[0])][0])


def test_grey_is_replicated_to_rgb_under_a_transform(tmp_path, no_env):
    from torchvision.transforms import ToTensor

    write_all(tmp_path)
    ds = create_dataset("fashion-mnist", tmp_path)
    x = create_dataset("fashion-mnist", tmp_path, transform=ToTensor())[0][0]
    assert x.shape == (3, 28, 28) and all(torch.equal(x[c], ds[0][0][0]) for c in range(3))


def test_search_order(tmp_path, no_env, monkeypatch):
    """--data-dir, then CMW_DATA_DIR, then torchvision's FashionMNIST/raw under either, then the system folder."""
    given, env, system = tmp_path / "given", tmp_path / "env", tmp_path / "system"
    write_all(env / "FashionMNIST" / "raw", n=13)
    write_all(system, n=14)
    monkeypatch.setitem(mnist.LAYOUTS, "fashion-mnist", mnist.Layout("FashionMNIST", mnist.LAYOUTS["fashion-mnist"]
                                                                      .classes, system))
    assert len(create_dataset("fashion-mnist")) == 14  # nothing given: the system folder
    monkeypatch.setenv("CMW_DATA_DIR", str(env))
    assert len(create_dataset("fashion-mnist")) == 13  # CMW_DATA_DIR's torchvision layout
    write_all(env, n=15)
    assert len(create_dataset("fashion-mnist")) == 15  # CMW_DATA_DIR itself comes before its FashionMNIST/raw
    write_all(given / "FashionMNIST" / "raw", n=16)
    assert len(create_dataset("fashion-mnist", given)) == 15  # CMW_DATA_DIR before the layouts under either
    write_all(given, n=17)
    assert len(create_dataset("fashion-mnist", given)) == 17
    assert mnist.search_dirs("fashion-mnist", given) == [given, env, given / "FashionMNIST" / "raw",
                                                         env / "FashionMNIST" / "raw", system]


def test_mnist_and_kmnist_read_a_given_folder_or_torchvision_layout(tmp_path, no_env):
    write_all(tmp_path / "KMNIST" / "raw", gz=False)
    write_all(tmp_path / "MNIST" / "raw")
    kmnist = create_dataset("kmnist", tmp_path)
    assert kmnist.classes[:2] == ["o", "ki"] and len(kmnist) == 12
    assert create_dataset("mnist", tmp_path).classes == [str(d) for d in range(10)]
    assert "MNIST" in str(create_dataset("mnist", tmp_path).root)
    with pytest.raises(UserError, match=r"kmnist: no idx files .* looked in nowhere"):
        create_dataset("kmnist")  # no system folder for kmnist


def test_missing_files_name_the_places_and_the_install_command(tmp_path, no_env):
    monkeypatched = mnist.LAYOUTS["fashion-mnist"]
    assert monkeypatched.system_dir is None
    with pytest.raises(UserError, match=rf"looked in {tmp_path}"):
        create_dataset("fashion-mnist", tmp_path)
    images, _labels = tiny()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    with pytest.raises(UserError, match=r"not train-labels-idx1-ubyte\[\.gz\] \(train split\)"):
        create_dataset("fashion-mnist", tmp_path)


def test_the_fashion_hint_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.delenv("CMW_DATA_DIR", raising=False)
    monkeypatch.setitem(mnist.LAYOUTS, "fashion-mnist", mnist.Layout("FashionMNIST", (), tmp_path / "absent"))
    with pytest.raises(UserError, match=r"apt-get install -y dataset-fashion-mnist"):
        create_dataset("fashion-mnist", tmp_path / "nothing")


def corrupt_cases(images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[int, bytes, str]]:
    """name -> (file index 0 images / 1 labels, bytes, expected message)."""
    good = idx_bytes(images)
    return {
        "wrong magic": (0, idx_bytes(images, magic=0x00000801, dims=images.shape), r"magic number 0x00000801, "
                        r"expected 0x00000803"),
        "labels as images": (0, idx_bytes(labels), r"magic number 0x00000801, expected 0x00000803"),
        "truncated data": (0, good[:-100], r"truncated: the header promises 12 images"),
        "truncated header": (0, good[:10], r"truncated inside its header"),
        "empty": (0, b"", r"truncated: images file shorter than its 4-byte magic"),
        "trailing bytes": (0, good + b"\0", r"more bytes than the header's 12 images"),
        "wrong size": (0, idx_bytes(images.reshape(12, 49, 16)), r"images of 49x16 pixels"),
        "short labels": (1, idx_bytes(labels[:11]), r"holds 12 images but .* holds 11 labels"),
        "label range": (1, idx_bytes(np.where(np.arange(12) == 7, 10, labels)), r"label 10 at position 7 is outside"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases(*tiny())))
@pytest.mark.parametrize("gz", [True, False])
def test_every_bad_file_is_one_error_naming_it(tmp_path, no_env, case, gz):
    images, labels = tiny()
    write_split(tmp_path, "train", images, labels, gz=gz)
    which, content, message = corrupt_cases(images, labels)[case]
    path = tmp_path / (mnist.FILES["train"][which] + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(UserError, match=message) as err:
        create_dataset("fashion-mnist", tmp_path)
    assert str(path) in str(err.value)


def test_truncated_gzip_stream_names_the_file(tmp_path, no_env):
    images, labels = tiny()
    write_split(tmp_path, "train", images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(UserError, match=rf"{path}: truncated or corrupt gzip"):
        create_dataset("fashion-mnist", tmp_path)


def test_cli_bad_file_is_one_error_line_exit_2(tmp_path):
    images, labels = tiny()
    write_split(tmp_path, "train", images, labels[:5])
    out = run_cli("data", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "holds 5 labels" in out.stderr
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in out.stderr


# --- the real files ----------------------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_files_load_fast_with_the_documented_counts(fashion_dir):
    start = time.perf_counter()
    train = create_dataset("fashion-mnist")
    seconds = time.perf_counter() - start
    test = create_dataset("fashion-mnist", split="test")
    assert train.data.shape == (60000, 28, 28, 1) and train.data.dtype == np.uint8
    assert train.class_counts().tolist() == [6000] * 10 and test.class_counts().tolist() == [1000] * 10
    assert train.labels_digest() == FASHION_TRAIN_DIGEST
    assert seconds < 6.0, f"60,000 images took {seconds:.1f} s (README: <= 2 s on an idle machine)"


@pytest.mark.real_data
def test_cli_data_reports_counts_and_digest(fashion_dir, capsys):
    code, out, err = call_main(["data", "--dataset", "fashion-mnist", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["num_samples"] == 60000 and info["labels_digest"] == FASHION_TRAIN_DIGEST
    assert info["class_names"][0] == "T-shirt/top" and info["files"] == str(fashion_dir)


@pytest.mark.real_data
@pytest.mark.parametrize("cut", ["images", "labels", "gzip"])
def test_truncated_copies_of_the_real_files(fashion_dir, tmp_path, no_env, cut):
    for stem in (*mnist.FILES["train"], *mnist.FILES["test"]):
        shutil.copy(fashion_dir / f"{stem}.gz", tmp_path / f"{stem}.gz")
    if cut == "gzip":  # the compressed stream itself is cut
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[: 1 << 20])
        message = "truncated or corrupt gzip"
    else:  # an interrupted extraction: the uncompressed file is cut (it is read before the .gz beside it)
        gz = tmp_path / f"train-{cut}-idx{3 if cut == 'images' else 1}-ubyte.gz"
        path = gz.with_suffix("")
        path.write_bytes(gzip.decompress(gz.read_bytes())[:-784])
        message = "truncated: the header promises 60000"
    with pytest.raises(UserError, match=message) as err:
        create_dataset("fashion-mnist", tmp_path)
    assert str(path) in str(err.value)
    assert len(create_dataset("fashion-mnist", tmp_path, "test")) == 10000  # the test split is intact


def test_apply_defaults_follow_the_dataset(tmp_path, no_env, capsys):
    """Unset options take the dataset's defaults (lenet, lr 0.05, 15 epochs); the command line and --config win."""
    from cmw_transfer.trainer.config import apply_defaults_for

    write_all(tmp_path / "data", n=40)
    base = ["apply", "--weighting", "none", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
            "--batch-size", "16", "--workers", "0", "--no-progress"]
    code, _, err = call_main([*base, "--epochs", "1", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["model"], saved["lr"], saved["epochs"]) == ("lenet", 0.05, 1)
    saved["model"], saved["lr"] = "small_cnn", 0.02
    (tmp_path / "edited.json").write_text(json.dumps(saved))
    code, _, err = call_main([*base, "--config", str(tmp_path / "edited.json"), "--lr", "0.03",
                              "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    replay = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (replay["model"], replay["lr"], replay["epochs"]) == ("small_cnn", 0.03, 1)
    assert apply_defaults_for("fashion-mnist-pmd") == {"model": "lenet", "epochs": 15, "lr": 0.05}
    assert apply_defaults_for("digits") == {} and apply_defaults_for("cifar10") == {}


def test_real_data_tests_skip_naming_the_install_command_and_fail_in_ci(tmp_path, no_env, monkeypatch):
    from tests.realdata import REQUIRE, fashion_mnist_dir

    monkeypatch.delenv(REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install -y dataset-fashion-mnist"):
        fashion_mnist_dir()
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match=r"CMW_REQUIRE_REAL_DATA=1 but this test needs"):
        fashion_mnist_dir()
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert ci.index(f"export {REQUIRE}=1") < ci.index(".venv/bin/python -m pytest")
    write_all(tmp_path)
    monkeypatch.setenv("CMW_DATA_DIR", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path


@pytest.mark.parametrize("name", ["fashion-mnist", "digits"])
def test_batched_fetch_equals_one_sample_at_a_time(tmp_path, no_env, name):
    """The DataLoader's batched path (``__getitems__``) gives the same bits as ``ds[i]``, for uint8 and float stores."""
    from torch.utils.data import DataLoader

    write_all(tmp_path, n=30)
    ds = create_dataset(name, tmp_path if name != "digits" else None, noise="sym:0.5", imbalance=2)
    idx = [7, 0, 3, 3, len(ds) - 1]
    for (xa, ya, ia), (xb, yb, ib) in zip(ds.__getitems__(idx), [ds[i] for i in idx], strict=True):
        assert torch.equal(xa, xb) and (ya, ia) == (yb, ib) and isinstance(ya, int)
    x, y, _ = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert torch.equal(x, torch.stack([ds[k][0] for k in range(len(ds))]))
    assert torch.equal(y, torch.as_tensor(ds.targets))


def test_worker_loader_fetches_whole_batches_with_the_same_result(tmp_path, no_env):
    """With workers the loader wraps the set (per-sample seeding); a transform-free in-memory set is still fetched
    a batch at a time, and the batches equal the main-process loader's."""
    from cmw_transfer.trainer.engine.loaders import make_loader

    write_all(tmp_path, n=40)
    ds = create_dataset("fashion-mnist", tmp_path, noise="sym:0.3")
    batches = []
    for workers in (0, 1):
        loader = make_loader(ds, 8, train=True, workers=workers, seed=3, distributed=False)
        loader.set_epoch(2)
        batches.append(list(loader))
        assert workers == 0 or hasattr(loader.dataset, "__getitems__")
    for (xa, ya, ia), (xb, yb, ib) in zip(*batches, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)

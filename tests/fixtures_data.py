"""Writers for tiny datasets in the exact on-disk formats of the real ones (used by the dataset tests)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_png(path: Path, value: int = 128, size: int = 8) -> Path:
    """A small solid RGB PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path, format="PNG")
    return path


def write_broken_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


def py2_pickle(obj: object) -> bytes:
    """``obj`` as Python 2's cPickle wrote it with protocol 2, the format of the original CIFAR files.

    bytes are py2 ``str`` (SHORT_BINSTRING / BINSTRING, no ``_codecs.encode``); str is ``unicode``; an ndarray is
    ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` with the state ``(1, shape,
    numpy.dtype('u1', 0, 1) + (3, '|', None, None, None, -1, -1, 0), False, raw bytes)``, as numpy 1.x wrote it;
    memo puts as cPickle made them. Loaded with ``encoding="bytes"``, as the CIFAR readers do.
    """
    out, memo = bytearray(b"\x80\x02"), [0]

    def put() -> None:
        memo[0] += 1
        out.extend(b"q" + bytes([memo[0]]) if memo[0] < 256 else b"r" + memo[0].to_bytes(4, "little"))

    def string(data: bytes, keep: bool = True) -> None:
        out.extend(b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + len(data).to_bytes(4, "little"))
        out.extend(data)
        if keep and len(data) > 1:
            put()

    def integer(n: int) -> None:
        if 0 <= n < 256:
            out.extend(b"K" + bytes([n]))
        elif 0 <= n < 65536:
            out.extend(b"M" + n.to_bytes(2, "little"))
        elif -2**31 <= n < 2**31:
            out.extend(b"J" + n.to_bytes(4, "little", signed=True))
        else:
            raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            out.extend(b"\x8a" + bytes([len(raw)]) + raw)

    def save(value: object) -> None:
        if isinstance(value, bool):
            out.extend(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            integer(value)
        elif isinstance(value, float):
            out.extend(b"G" + struct.pack(">d", value))
        elif value is None:
            out.extend(b"N")
        elif isinstance(value, bytes):
            string(value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
            out.extend(b"X" + len(data).to_bytes(4, "little") + data)
            put()
        elif isinstance(value, tuple):
            if len(value) <= 3:
                for item in value:
                    save(item)
                out.extend([b")", b"\x85", b"\x86", b"\x87"][len(value)])
            else:
                out.extend(b"(")
                for item in value:
                    save(item)
                out.extend(b"t")
        elif isinstance(value, list | dict):
            out.extend(b"]" if isinstance(value, list) else b"}")
            put()
            if value:
                out.extend(b"(")
                for item in value.items() if isinstance(value, dict) else value:
                    for part in item if isinstance(value, dict) else (item,):
                        save(part)
                out.extend(b"e" if isinstance(value, list) else b"u")
        elif isinstance(value, np.ndarray):
            order, spec = value.dtype.str[0], value.dtype.str[1:]
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n")
            put()
            out.extend(b"cnumpy\nndarray\n")
            put()
            out.extend(b"K\x00\x85")
            string(b"b", keep=False)
            out.extend(b"\x87R")
            put()
            out.extend(b"(K\x01")
            save(tuple(int(n) for n in value.shape))
            out.extend(b"cnumpy\ndtype\n")
            put()
            string(spec.encode(), keep=False)
            out.extend(b"K\x00K\x01\x87R")
            put()
            out.extend(b"(K\x03")
            string(order.encode(), keep=False)
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(np.ascontiguousarray(value).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(f"py2_pickle: {type(value).__name__} is not in a CIFAR file")

    save(obj)
    out.extend(b".")
    return bytes(out)


def _pickle(path: Path, obj: dict, style: str = "py2") -> None:
    """``py2``: the bytes of the original files (:func:`py2_pickle`); ``py3``: ``pickle.dump(protocol=2)`` as a
    Python 3 re-pickle writes them (bytes through ``_codecs.encode``, ``numpy._core``)."""
    path.write_bytes(py2_pickle(obj) if style == "py2" else pickle.dumps(obj, protocol=2))


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 10, style: str = "py2") -> dict:
    """``cifar-10-batches-py`` with five training batches, a test batch and ``batches.meta`` (bytes keys);
    ``style`` as in :func:`_pickle`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = []
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(per_batch)]
        train_labels += labels
        batch = {b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels,
                 b"data": cifar_images(per_batch, b),
                 b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}
        _pickle(folder / f"data_batch_{b}", batch, style)
    test_labels = [i % 10 for i in range(n_test)]
    test_data = cifar_images(n_test, 99)
    _pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels,
                                    b"data": test_data, b"filenames": [b"t.png"] * n_test}, style)
    _pickle(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                      b"label_names": [n.encode() for n in CIFAR10_NAMES]}, style)
    return {"train_labels": train_labels, "test_labels": test_labels, "test_data": test_data}


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, style: str = "py2") -> dict:
    """``cifar-100-python/{train,test,meta}`` with fine and coarse labels."""
    from cmw_transfer.bias.maps import CIFAR100_COARSE

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        _pickle(folder / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                                 b"coarse_labels": [int(CIFAR100_COARSE[f]) for f in fine],
                                 b"data": cifar_images(n, 7)}, style)
        out[f"{split}_labels"] = fine
    _pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, style)
    return out


def write_webvision(root: Path, google_per_class: int = 2, flickr_per_class: int = 1, val_per_class: int = 1) -> dict:
    """``info/train_filelist_{google,flickr}.txt`` and ``info/val_filelist.txt`` for all 1000 classes; only the
    first Google image and the first val image exist as files."""
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    google = [(f"google/q{c + 1:04d}/{c:04d}_{k}.jpg", c) for c in range(1000) for k in range(google_per_class)]
    flickr = [(f"flickr/q{c + 1:04d}/{c:04d}_{k}.jpg", c) for c in range(1000) for k in range(flickr_per_class)]
    val = [(f"val{c:04d}_{k}.jpg", c) for c in range(1000) for k in range(val_per_class)]
    for name, rows in (("train_filelist_google.txt", google), ("train_filelist_flickr.txt", flickr),
                       ("val_filelist.txt", val)):
        (info / name).write_text("".join(f"{p} {label}\n" for p, label in rows))
    write_png(root / google[0][0], 10)
    write_png(root / "val_images_256" / val[0][0], 20)
    return {"google": google, "flickr": flickr, "val": val}


def write_imagenet_lt(root: Path, in_subfolder: bool = True) -> dict:
    """``ImageNet_LT_{train,val,test,open}.txt`` (in ``root/ImageNet_LT/``), images relative to ``root``."""
    lists = root / "ImageNet_LT" if in_subfolder else root
    lists.mkdir(parents=True, exist_ok=True)
    train = [(f"train/n{c:08d}/n{c:08d}_{k}.JPEG", c) for c in range(1000) for k in range(1 + (c % 3 == 0) * 4)]
    val = [(f"val/n{c:08d}/ILSVRC2012_val_{c:08d}.JPEG", c) for c in range(1000)]
    test = [(f"val/n{c:08d}/ILSVRC2012_val_{c + 5000:08d}.JPEG", c) for c in range(1000)]
    opened = [(f"ImageNet_LT_open/open_{k}.jpg", -1 if k % 2 else 1000) for k in range(4)]
    for split, rows in (("train", train), ("val", val), ("test", test), ("open", opened)):
        (lists / f"ImageNet_LT_{split}.txt").write_text("".join(f"{p} {label}\n" for p, label in rows))
    write_png(root / train[0][0], 30)
    return {"train": train, "val": val, "test": test, "open": opened}


def write_clothing1m(root: Path) -> dict:
    """Clothing1M's kv label files and key lists; 14 classes, a few clean keys overlap the noisy ones."""
    root.mkdir(parents=True, exist_ok=True)
    noisy = [(f"images/{c % 10}/{c:02d}/{c}_{k}.jpg", (c + k) % 14) for c in range(14) for k in range(3)]
    clean = [(f"images/{c % 10}/{c:02d}/clean_{c}_{k}.jpg", c) for c in range(14) for k in range(3)]
    (root / "noisy_label_kv.txt").write_text("".join(f"{p} {label}\n" for p, label in noisy))
    (root / "clean_label_kv.txt").write_text("".join(f"{p} {label}\n" for p, label in clean))
    (root / "noisy_train_key_list.txt").write_text("".join(f"{p}\n" for p, _ in noisy))
    (root / "clean_train_key_list.txt").write_text("".join(f"{p}\n" for p, _ in clean[0::3]))
    (root / "clean_val_key_list.txt").write_text("".join(f"{p}\n" for p, _ in clean[1::3]))
    (root / "clean_test_key_list.txt").write_text("".join(f"{p}\n" for p, _ in clean[2::3]))
    write_png(root / noisy[0][0], 40)
    return {"noisy": noisy, "clean": clean}


def write_animal10n(root: Path, per_class: int = 3) -> dict:
    """``training/`` and ``testing/`` with PNG-decodable files named ``<label>_<id>.jpg``."""
    out = {}
    for folder, n in (("training", per_class), ("testing", 1)):
        labels = []
        for c in range(10):
            for k in range(n):
                write_png(root / folder / f"{c}_{c * 100 + k:05d}.jpg", 10 * c)
                labels.append(c)
        out[folder] = labels
    return out

"""The MNIST idx format: Fashion-MNIST, MNIST and KMNIST, as their authors ship them and torchvision downloads them.

Four files per dataset, gzipped or not: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``. An idx file is a big-endian header -- magic ``0x00000803``
(unsigned bytes, 3 dimensions: images) or ``0x00000801`` (1 dimension: labels), then one uint32 per dimension --
followed by the values. Every header field is checked against the bytes that follow it, so a truncated download, a
file of the wrong kind or images and labels of different lengths is one error naming the file, not a silently
shorter dataset.

Where the files are looked for (the first folder that holds any of the four wins; the split's two files must
then be there):

1. ``--data-dir`` (``root``), 2. ``$CMW_DATA_DIR``, 3. torchvision's layout under either (``ROOT/FashionMNIST/raw``,
``ROOT/MNIST/raw``, ``ROOT/KMNIST/raw``), 4. for Fashion-MNIST only, the Debian package's folder
``/usr/share/datasets/fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``).

Images stay uint8 in memory (``N x 28 x 28 x 1``, 47 MB for 60,000); a batch becomes float tensors only when it
is loaded, so views and subsets never copy the images.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cmw_transfer.dataset.base import InMemoryDataset
from cmw_transfer.errors import UserError

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
SIDE = 28
NUM_CLASSES = 10
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_INSTALL = "apt-get install -y dataset-fashion-mnist"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Layout:
    folder: str  # torchvision's class name: ROOT/<folder>/raw
    classes: tuple[str, ...]
    system_dir: Path | None = None  # a distribution package's folder


LAYOUTS = {
    "fashion-mnist": Layout("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                             "Sneaker", "Bag", "Ankle boot"), DEBIAN_DIR),
    "mnist": Layout("MNIST", tuple(str(d) for d in range(10))),
    "kmnist": Layout("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
NAMES = tuple(LAYOUTS)


def search_dirs(name: str, root: str | Path | None) -> list[Path]:
    """The folders looked in, in order (module docstring)."""
    layout = LAYOUTS[name]
    bases = [Path(p).expanduser() for p in (root, os.environ.get("CMW_DATA_DIR")) if p]
    dirs = [*bases, *(b / layout.folder / "raw" for b in bases)]
    if layout.system_dir is not None:
        dirs.append(layout.system_dir)
    return list(dict.fromkeys(dirs))


def _present(folder: Path, stem: str) -> Path | None:
    """The uncompressed file if present (no decompression), else the ``.gz`` one."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def find_files(name: str, root: str | Path | None, split: str) -> tuple[Path, Path]:
    """``(images, labels)`` of ``split`` in the first folder of :func:`search_dirs` that holds any idx file."""
    stems = [stem for pair in FILES.values() for stem in pair]
    for folder in search_dirs(name, root):
        if not any(_present(folder, stem) for stem in stems):
            continue
        found = [_present(folder, stem) for stem in FILES[split]]
        missing = [stem for stem, path in zip(FILES[split], found, strict=True) if path is None]
        if missing:
            raise UserError(f"{name}: {folder} holds idx files but not {' or '.join(missing)}[.gz] ({split} split); "
                            "copy the four original files there")
        return found[0], found[1]  # type: ignore[return-value]
    looked = ", ".join(str(d) for d in search_dirs(name, root)) or "nowhere (no --data-dir, no CMW_DATA_DIR)"
    hint = f", or install them: {DEBIAN_INSTALL} (as root)" if LAYOUTS[name].system_dir is not None else ""
    raise UserError(f"{name}: no idx files ({FILES[split][0]}[.gz], ...) found; looked in {looked}. Pass --data-dir "
                    f"DIR (the folder with the four files, or the one torchvision downloaded into){hint}")


def _read_exact(fh: BinaryIO, out: np.ndarray | bytearray) -> int:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            break
        done += got
    return done


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """The values of one idx file as a writable uint8 array shaped by its header; every mismatch is a UserError."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            fh: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # type: ignore[assignment]
            header = bytearray(4)
            if _read_exact(fh, header) < 4:
                raise UserError(f"{path}: truncated: {what} file shorter than its 4-byte magic number")
            found = int.from_bytes(header, "big")
            if found != magic:
                raise UserError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} ({what}, unsigned "
                                "bytes); not an idx file of that kind")
            ndim = magic & 0xFF
            dims_raw = bytearray(4 * ndim)
            if _read_exact(fh, dims_raw) < len(dims_raw):
                raise UserError(f"{path}: truncated inside its header ({ndim} dimensions expected)")
            dims = tuple(int(d) for d in np.frombuffer(bytes(dims_raw), dtype=">u4"))
            if ndim == 3 and dims[1:] != (SIDE, SIDE):
                raise UserError(f"{path}: images of {dims[1]}x{dims[2]} pixels; the MNIST family is {SIDE}x{SIDE}")
            data = np.empty(dims, dtype=np.uint8)
            got = _read_exact(fh, data)
            if got < data.size:
                raise UserError(f"{path}: truncated: the header promises {dims[0]} {what} ({data.size} bytes), the "
                                f"file holds {got}; download it again")
            if fh.read(1):
                raise UserError(f"{path}: more bytes than the header's {dims[0]} {what}; not an idx file of that "
                                "kind, or a corrupt one")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(f"{path}: truncated or corrupt gzip data ({exc}); download it again") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    return data


def load_arrays(name: str, root: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """``(images N x 28 x 28 uint8, labels N int64, folder)`` of one split, validated."""
    images_path, labels_path = find_files(name, root, split)
    images = read_idx(images_path, IMAGES_MAGIC, "images")
    labels = read_idx(labels_path, LABELS_MAGIC, "labels")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} "
                        "labels; the two files are not a pair")
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise UserError(f"{labels_path}: label {int(labels[bad[0]])} at position {int(bad[0])} is outside "
                        f"0..{NUM_CLASSES - 1}; the file is corrupt")
    return images, labels.astype(np.int64), images_path.parent


def load(name: str, root: str | Path | None, split: str = "train", **kwargs: Any) -> InMemoryDataset:
    """One split as an :class:`InMemoryDataset` of uint8 ``28 x 28 x 1`` images (ground truth = the file labels)."""
    if split not in FILES:
        raise UserError(f"{name} has splits {', '.join(FILES)}, not {split!r}")
    kwargs.pop("allow_empty_classes", None)
    images, labels, folder = load_arrays(name, root, split)
    return InMemoryDataset(name, images[..., None], labels, NUM_CLASSES, clean_targets=labels,
                           classes=list(LAYOUTS[name].classes), root=folder, split=split, **kwargs)

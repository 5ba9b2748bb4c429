"""A CIFAR folder is untrusted input: no pickle payload runs, and bad content is one error line (issue 22, 1 + 6)."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from cmw_transfer.dataset import create_dataset
from cmw_transfer.dataset.formats.cifar import CifarUnpickler
from cmw_transfer.errors import UserError
from tests.fixtures_data import py2_pickle, write_cifar10, write_cifar100
from tests.helpers import call_main, run_cli

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR100_FILES = ["train", "test", "meta"]
ALL_FILES = [("cifar10", "cifar-10-batches-py", f) for f in CIFAR10_FILES] + \
            [("cifar100", "cifar-100-python", f) for f in CIFAR100_FILES]


class Payload:
    """Unpickling this opens (creates) ``marker``: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class SystemPayload(Payload):
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write(root, name, style="py2"):
    return write_cifar10(root, style=style) if name == "cifar10" else write_cifar100(root, style=style)


def _poison(path, marker, where: str) -> None:
    """Re-write ``path`` with a payload at ``where``: a new first key, inside a list, or as the whole file."""
    batch = pickle.loads(path.read_bytes(), encoding="bytes")  # our own fixture, written by this test
    payload = Payload(str(marker)) if where != "system" else SystemPayload(str(marker))
    if where == "top":
        obj = payload
    elif where == "list":
        key = next(k for k, v in batch.items() if isinstance(v, list))
        obj = {**batch, key: [payload, *batch[key]]}
    else:
        obj = {b"evil": payload, **batch}
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize(("name", "folder", "file"), ALL_FILES)
@pytest.mark.parametrize("where", ["first-key", "list", "top", "system"])
def test_a_payload_in_any_cifar_file_never_runs(tmp_path, name, folder, file, where):
    _write(tmp_path, name)
    marker = tmp_path / "PWNED"
    _poison(tmp_path / folder / file, marker, where)
    split = "test" if file in ("test_batch", "test") else "train"
    with pytest.raises(UserError, match=rf"{file}: refused to load it: it calls .*, which no CIFAR file holds") as exc:
        create_dataset(name, tmp_path, split, download=False)
    assert "\n" not in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_restricted_reader_gives_exactly_what_pickle_gives(tmp_path, style):
    """The original byte format (py2 cPickle) and a py3 re-pickle load to the objects plain pickle makes."""
    write_cifar10(tmp_path, style=style)
    write_cifar100(tmp_path, style=style)
    for _, folder, file in ALL_FILES:
        blob = (tmp_path / folder / file).read_bytes()
        ours = CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
        trusted = pickle.loads(blob, encoding="bytes")
        assert ours.keys() == trusted.keys()
        for key, value in trusted.items():
            got = ours[key].array if hasattr(ours[key], "array") else ours[key]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and np.array_equal(got, value)
            else:
                assert got == value
    assert create_dataset("cifar10", tmp_path, "train", download=False).targets.size == 100


def test_integer_arrays_in_any_byte_order_load(tmp_path):
    """Labels saved as an int64 array (big-endian here) are integer data too; floats and objects are not."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    labels = np.asarray(batch[b"labels"], dtype=">i8")
    path.write_bytes(py2_pickle({**batch, b"labels": labels}))
    ds = create_dataset("cifar10", tmp_path, "train", download=False)
    assert ds.targets[20:40].tolist() == labels.tolist()
    for bad in (np.asarray(batch[b"labels"], dtype=np.float64), np.asarray(batch[b"labels"], dtype=object)):
        path.write_bytes(pickle.dumps({**batch, b"labels": bad}, protocol=2))
        with pytest.raises(UserError, match="data_batch_2: refused to load it"):
            create_dataset("cifar10", tmp_path, "train", download=False)


# a py2-format pickle naming globals the reader must refuse, each placed where the array machinery sits
@pytest.mark.parametrize("opcodes", [
    b"cposix\nsystem\nU\x04trueK\x00\x86R.",                                    # os.system, as py2 spelled it
    b"cnumpy\nload\nU\x01x\x85R.",                                               # numpy, but not a CIFAR name
    b"cnumpy.core.multiarray\nscalar\nU\x01x\x85R.",
    b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.",          # only the latin1 form of bytes
    b"cnumpy.core.multiarray\n_reconstruct\nc__builtin__\neval\nK\x00\x85U\x01b\x87R.",
    b"cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R.",                                   # object dtype
    b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NN}NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
    b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01"
    b"\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x06\x00\x00\x00\x00\x00\x01\x86"        # shape (2^40, 2^40)
    b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R\x89U\x00tb.",                                # and no data
], ids=["posix.system", "numpy.load", "multiarray.scalar", "codecs-zlib", "reconstruct-eval", "dtype-O",
        "dtype-fields", "huge-shape"])
def test_refused_globals_and_states(tmp_path, opcodes):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(b"\x80\x02" + opcodes)
    with pytest.raises(UserError, match=r"batches\.meta: refused to load it"):
        create_dataset("cifar10", tmp_path, "train", download=False)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda b: {**b, b"labels": [str(v).encode() for v in b[b"labels"]]}, r"list of integer labels, got a list "
                                                                          r"of 20 holding bytes b'4'"),
    (lambda b: {**b, b"labels": [float(v) for v in b[b"labels"]]}, "list of integer labels"),
    (lambda b: {**b, b"labels": [True] * 20}, "list of integer labels"),
    (lambda b: {**b, b"labels": b"0123"}, "list of integer labels, got bytes"),
    (lambda b: {**b, b"labels": [2**70] * 20}, "too large"),
    (lambda b: {**b, b"labels": b[b"labels"][:-1]}, "20 images but 19 labels"),
    (lambda b: {**b, b"data": b[b"data"][:, :100]}, r"N x 3072 uint8 array, got a uint8 array of shape \(20, 100\)"),
    (lambda b: {**b, b"data": b[b"data"].reshape(20, 3, 32, 32)}, "N x 3072"),
    (lambda b: {**b, b"data": b[b"data"].tolist()}, "N x 3072 uint8 array, got a list"),
    (lambda b: {**b, b"data": b[b"data"].astype(np.int64) * 300}, "outside 0..255"),
    (lambda b: {b"labels": b[b"labels"]}, "missing b'data'"),
    (lambda b: [b], "got list, not a dict"),
])
def test_malformed_cifar_content_is_one_line(tmp_path, edit, message):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(py2_pickle(edit(pickle.loads(path.read_bytes(), encoding="bytes"))))
    with pytest.raises(UserError, match=message) as exc:
        create_dataset("cifar10", tmp_path, "train", download=False)
    assert "data_batch_4" in str(exc.value) and "\n" not in str(exc.value)


def test_malformed_meta_is_one_line(tmp_path):
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "meta"
    path.write_bytes(py2_pickle({b"fine_label_names": [b"a", 5]}))
    with pytest.raises(UserError, match=r"meta: b'fine_label_names' must be a list of 100 class names"):
        create_dataset("cifar100", tmp_path, "train", download=False)


def _poison_all(root, name):
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    markers = []
    for path in sorted(folder.iterdir()):
        markers.append(root / f"PWNED-{path.name}")
        _poison(path, markers[-1], "first-key")
    return markers


@pytest.mark.parametrize("args", [
    ("data", "--dataset", "cifar10"),
    ("data", "--dataset", "cifar100", "--split", "test"),
    ("metatrain", "--src", "cifar10-pmd", "--epochs", "1", "--device", "cpu", "--workers", "0"),
    ("apply", "--dataset", "cifar10", "--weighting", "none", "--model", "small_cnn", "--epochs", "1",
     "--device", "cpu", "--workers", "0"),
], ids=["data-cifar10", "data-cifar100-test", "metatrain-cifar10-pmd", "apply-cifar10"])
def test_cli_never_runs_a_payload(tmp_path, capsys, args):
    name = "cifar100" if "cifar100" in args else "cifar10"
    _write(tmp_path / "d", name)
    markers = _poison_all(tmp_path / "d", name)
    out = ("--out", str(tmp_path / "run")) if args[0] in ("apply", "metatrain") else ()
    code, _, err = call_main([*args, "--data-dir", str(tmp_path / "d"), *out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "refused to load it" in err
    assert not any(m.exists() for m in markers)


def test_cli_entry_point_refuses_a_payload_in_one_line(tmp_path):
    write_cifar10(tmp_path)
    markers = _poison_all(tmp_path, "cifar10")
    proc = run_cli("data", "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "data_batch_1: refused to load it: it calls io.open, which no CIFAR file holds" in proc.stderr
    assert not any(m.exists() for m in markers)

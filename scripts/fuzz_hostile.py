"""Fixtures of ``scripts/fuzz_cli.py``'s hostile-file cases (issue 22): CIFAR folders with a pickle payload in each
file kind, a device node and a FIFO as output targets, nets with a hostile header, a protocol-4 pickle payload.

Every payload *prints* ``PWNED-...`` when it runs, so a case that forbids that text in the output fails if any
code ran. A device node needs ``mknod`` (root); elsewhere its cases are skipped.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "PWNED"
CIFAR_KINDS = {  # kind -> (dataset, folder, file)
    "c10-train": ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    "c10-test": ("cifar10", "cifar-10-batches-py", "test_batch"),
    "c10-meta": ("cifar10", "cifar-10-batches-py", "batches.meta"),
    "c100-train": ("cifar100", "cifar-100-python", "train"),
    "c100-test": ("cifar100", "cifar-100-python", "test"),
    "c100-meta": ("cifar100", "cifar-100-python", "meta"),
}


class Payload:
    """Unpickling it calls ``print``: code ran."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __reduce__(self):
        return print, (self.text,)


def _cifar(root: Path) -> None:
    """One folder per file kind: the clean fixture with that file replaced by a payload as its first key (the
    rest of the batch does not matter: a reader that runs code has run it by then); and string labels."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures_data import cifar_images, py2_pickle, write_cifar10, write_cifar100

    clean = root / "clean"
    write_cifar10(clean)
    write_cifar100(clean)
    for kind, (_, folder, file) in CIFAR_KINDS.items():
        shutil.copytree(clean / folder, root / kind / folder)
        batch = {b"x": Payload(f"{MARK}-{kind}"), b"data": cifar_images(2, 0), b"labels": [0, 1]}
        (root / kind / folder / file).write_bytes(pickle.dumps(batch, protocol=2))
    shutil.copytree(clean / "cifar-10-batches-py", root / "c10-str-labels" / "cifar-10-batches-py")
    batch = {b"data": cifar_images(20, 2), b"labels": [str(i % 10).encode() for i in range(20)]}
    (root / "c10-str-labels" / "cifar-10-batches-py" / "data_batch_2").write_bytes(py2_pickle(batch))


def _header_text(path: Path, edit, nest: int = 0) -> None:
    """Edit the safetensors header of ``path``; ``"__deep__"`` in it becomes a list nested ``nest`` levels deep."""
    blob = path.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    edit(header)
    deep = "[" * nest + "]" * nest  # inside the config string (an escaped string there) or in the header itself
    text = json.dumps(header).replace('\\"__deep__\\"', deep).replace('"__deep__"', deep).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size:])


def _config(edit):
    def apply(header):
        key = "cmw_transfer.config"
        config = json.loads(header["__metadata__"][key])
        edit(config)
        header["__metadata__"][key] = json.dumps(config)
    return apply


def _nets(nets: Path) -> None:
    """Variants of ``nets/good`` (written by fuzz_cli) with hostile headers and metadata."""
    def variant(name: str) -> Path:
        shutil.copytree(nets / "good", nets / name)
        (nets / name / "config.json").unlink()
        return nets / name / "model.safetensors"

    weights = variant("huge_header")
    blob = weights.read_bytes()
    weights.write_bytes((2**62).to_bytes(8, "little") + blob[8:])
    _header_text(variant("deep_provenance"), _config(lambda c: c.update(provenance={"x": "__deep__"})), 30_000)
    _header_text(variant("deep_header"), lambda h: h.update(x="__deep__"), 50_000)
    shutil.copytree(nets / "good", nets / "deep_config_json")
    (nets / "deep_config_json" / "config.json").write_text("[" * 30_000 + "]" * 30_000)
    _header_text(variant("long_provenance"), _config(lambda c: c.update(provenance={"note": "n" * 1_000_000})))


def _targets(ws: Path) -> dict[str, str]:
    """A FIFO and (as root) a character device (1, 3: what /dev/null is) made here; run folders holding them."""
    targets = ws / "targets"
    targets.mkdir()
    os.mkfifo(targets / "fifo.png")
    places = {"fifo": str(targets / "fifo.png"), "dev": ""}
    try:
        os.mknod(targets / "dev.png", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        places["dev"] = str(targets / "dev.png")
    except (PermissionError, OSError):
        pass
    for name, make in (("fifo_run", os.mkfifo),
                       ("dev_run", lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3)))):
        if name == "dev_run" and not places["dev"]:
            continue
        (ws / name).mkdir()
        (ws / name / "families.json").write_text("{}\n")  # an apply run was here: --overwrite is needed
        make(ws / name / "config.json")
    return places


def write(ws: Path) -> dict[str, str]:
    """Write the fixtures under ``ws``; return the extra ``{placeholders}`` of the cases."""
    _cifar(ws / "cifar")
    _nets(ws / "nets")
    (ws / "evil.pkl").write_bytes(pickle.dumps({"a": Payload(f"{MARK}-torch")}, protocol=4))
    return _targets(ws)

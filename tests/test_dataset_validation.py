"""List files from careless editors and partial samples: BOMs, huge labels, classes left empty."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cmw_transfer.dataset import create_dataset, describe_empty_classes, empty_classes, nonempty_classes
from cmw_transfer.dataset.lists import MAX_LIST_CLASSES, parse_label_list
from cmw_transfer.errors import UserError
from tests.fixtures_data import write_webvision
from tests.helpers import call_main


def test_utf8_bom_is_stripped_and_nothing_else_moves(tmp_path):
    body = b"dir/a b.png 0\n\nc.png 2\nd.png 1\n"
    (tmp_path / "plain.txt").write_bytes(body)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + body)
    plain, bom = (parse_label_list(tmp_path / name, tmp_path) for name in ("plain.txt", "bom.txt"))
    assert [bom.paths.relative(i) for i in range(3)] == [plain.paths.relative(i) for i in range(3)]
    assert bom.paths.relative(0) == "dir/a b.png"
    assert bom.labels.tolist() == plain.labels.tolist() == [0, 2, 1]
    assert bom.line_numbers.tolist() == plain.line_numbers.tolist() == [1, 3, 4]


def test_utf16_list_is_named_as_such(tmp_path):
    (tmp_path / "l.txt").write_text("a.png 0\n", encoding="utf-16")
    with pytest.raises(UserError, match="UTF-16"):
        create_dataset(f"list:{tmp_path / 'l.txt'}")


@pytest.mark.parametrize("label", ["999999999999999999", str(MAX_LIST_CLASSES)])
def test_a_huge_label_is_refused_without_allocating_its_classes(tmp_path, label):
    (tmp_path / "l.txt").write_text(f"a.png 0\nb.png 1\nc.png {label}\n")
    start = time.perf_counter()
    with pytest.raises(UserError, match=rf"l.txt:3: label {label} is out of range"):
        create_dataset(f"list:{tmp_path / 'l.txt'}", allow_empty_classes=True)
    assert time.perf_counter() - start < 5  # refused up front, not after a bincount of 10**18 classes


def test_empty_class_helpers_agree_with_counts():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 3, size=rng.integers(1, 40))
        keep, empty = nonempty_classes(counts), empty_classes(counts)
        assert np.array_equal(np.sort(np.concatenate([keep, empty])), np.arange(counts.size))
        assert (counts[keep] > 0).all() and (counts[empty] == 0).all()
        message = describe_empty_classes(counts)
        assert (message is None) == (empty.size == 0)
        if message:
            assert message.startswith(f"{empty.size} of {counts.size} classes have no samples (class {empty[0]}")


def _drop_classes(root, classes):
    for name in ("train_filelist_google.txt", "train_filelist_flickr.txt"):
        path = root / "info" / name
        kept = [line for line in path.read_text().splitlines() if int(line.rsplit(" ", 1)[1]) not in classes]
        path.write_text("\n".join(kept) + "\n")


def test_webvision_with_empty_classes_loads_only_when_allowed(tmp_path):
    write_webvision(tmp_path)
    _drop_classes(tmp_path, {5, 900})
    with pytest.raises(UserError, match=r"2 of 1000 classes have no samples \(class 5, 900\)"):
        create_dataset("webvision-full", tmp_path)
    ds = create_dataset("webvision-full", tmp_path, allow_empty_classes=True)
    assert ds.num_classes == 1000 and empty_classes(ds.class_counts()).tolist() == [5, 900]


def test_data_reports_empty_classes_and_fits_families_without_them(capsys, tmp_path):
    write_webvision(tmp_path)
    _drop_classes(tmp_path, {3, 17, 999})
    code, out, _ = call_main(["data", "--dataset", "webvision-full", "--data-dir", str(tmp_path), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["empty_classes"] == [3, 17, 999] and info["num_empty_classes"] == 3
    assert [info["family_of_class"][c] for c in (3, 17, 999)] == [None] * 3
    assert sum(f["num_classes"] for f in info["families"]) == 997
    assert all(f["min_count"] is None or f["min_count"] > 0 for f in info["families"])
    code, out, _ = call_main(["data", "--dataset", "webvision-full", "--data-dir", str(tmp_path)], capsys)
    assert code == 0 and "empty:       3 of 1000 classes have no samples (class 3, 17, 999)" in out
    assert "class counts: min 3, median 3, max 3 (non-empty classes)" in out


def test_data_lists_empty_classes_of_a_small_list(capsys, tmp_path):
    (tmp_path / "l.txt").write_text("a.png 0\nb.png 0\nc.png 3\n")
    code, out, _ = call_main(["data", "--dataset", f"list:{tmp_path / 'l.txt'}"], capsys)
    assert code == 0 and "empty:       2 of 4 classes have no samples (class 1, 2)" in out
    assert "    1 1                       0  empty" in out

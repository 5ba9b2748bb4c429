"""Fast, vectorised parsing of ``relative/path label`` list files: no image is opened, no per-line Python.

The whole file is read as one byte array; line breaks, the last whitespace of each line (the path/label
separator, so paths may contain spaces) and the integer label are all found with NumPy array operations.
Paths stay as byte spans (:class:`~cmw_transfer.dataset.base.PathTable`). A 2.4M-line WebVision filelist
parses in well under a second (``scripts/bench_scan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmw_transfer.dataset.base import PathTable
from cmw_transfer.errors import UserError

_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True
_MAX_LABEL_DIGITS = 18
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
MAX_LIST_CLASSES = 1_000_000  # list: classes are 0..max label; a larger label is a typo, not a class


@dataclass
class ParsedList:
    """Non-blank lines of a list file: path spans, labels (or -1 for key lists) and 1-based line numbers."""

    source: Path
    paths: PathTable
    labels: np.ndarray
    line_numbers: np.ndarray


def _read(path: Path) -> np.ndarray:
    """The file's bytes, without a UTF-8 byte-order mark (Windows editors write one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"list file {path} not found") from None
    except OSError as exc:
        raise UserError(f"cannot read list file {path}: {exc.strerror or exc}") from None
    if data.startswith(_UTF16_BOMS):
        raise UserError(f"list file {path} is UTF-16 encoded; save it as UTF-8 ('relative/path label' lines)")
    return np.frombuffer(data, dtype=np.uint8, offset=len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0)


def _strip(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trim whitespace at both ends of each span (vectorised; loops only as deep as the longest run)."""
    s, e = starts.copy(), ends.copy()
    if not arr.size:
        return s, e
    while True:
        m = e > s
        m[m] = _WS[arr[e[m] - 1]]
        if not m.any():
            break
        e[m] -= 1
    while True:
        m = e > s
        m[m] = _WS[arr[s[m]]]
        if not m.any():
            break
        s[m] += 1
    return s, e


def _lines(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stripped spans of the non-blank lines and their 1-based line numbers."""
    newlines = np.flatnonzero(arr == 10)
    starts = np.concatenate(([0], newlines + 1)).astype(np.int64)
    ends = np.concatenate((newlines, [arr.size])).astype(np.int64)
    starts, ends = _strip(arr, starts, ends)
    keep = np.flatnonzero(ends > starts)
    return starts[keep], ends[keep], keep + 1


def _span_text(arr: np.ndarray, start: int, end: int) -> str:
    text = arr[start:end].tobytes().decode("utf-8", errors="replace")
    return text if len(text) <= 120 else text[:117] + "..."


def parse_label_list(
    path: str | Path, base: str | Path, *, num_classes: int | None = None, check_range: bool = True
) -> ParsedList:
    """Parse ``relative/path label`` lines; paths are relative to ``base``.

    Blank lines are ignored. A line without a separate integer label raises a UserError naming
    ``file:line``; so does a label outside ``0..num_classes-1`` (when ``num_classes`` is given, else any
    negative label); ``check_range=False`` leaves the labels as written.
    """
    path = Path(path)
    arr = _read(path)
    starts, ends, line_no = _lines(arr)
    ws_pos = np.flatnonzero(_WS[arr])
    k = np.searchsorted(ws_pos, ends) - 1  # last whitespace before each line end
    sep = np.where(k >= 0, ws_pos[np.maximum(k, 0)], -1)
    has_sep = sep >= starts
    lab_start = sep + 1
    neg = np.zeros(starts.size, dtype=bool)
    neg[has_sep] = arr[lab_start[has_sep]] == ord("-")
    dig_start = lab_start + neg
    n_dig = ends - dig_start
    ok = has_sep & (n_dig >= 1) & (n_dig <= _MAX_LABEL_DIGITS)
    values = np.zeros(starts.size, dtype=np.int64)
    for d in range(int(n_dig[ok].max()) if ok.any() else 0):
        active = ok & (n_dig > d)
        digit = arr[np.where(active, dig_start + d, 0)].astype(np.int64) - 48
        ok &= ~active | ((digit >= 0) & (digit <= 9))
        values = np.where(active, values * 10 + digit, values)
    bad = np.flatnonzero(~ok)
    if bad.size:
        b = bad[0]
        raise UserError(f"{path}:{int(line_no[b])}: malformed line {_span_text(arr, starts[b], ends[b])!r}; expected "
                        f"'relative/path label' with an integer label ({bad.size} malformed line(s) in the file)")
    values = np.where(neg, -values, values)
    path_starts, path_ends = _strip(arr, starts, np.maximum(sep, starts))
    parsed = ParsedList(path, PathTable(arr, path_starts, path_ends, Path(base)), values, line_no)
    if check_range:
        check_label_range(parsed, num_classes)
    return parsed


def check_label_range(parsed: ParsedList, num_classes: int | None) -> None:
    labels = parsed.labels
    top = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((labels < 0) | (labels >= top))
    if bad.size:
        b = bad[0]
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise UserError(f"{parsed.source}:{int(parsed.line_numbers[b])}: label {int(labels[b])} is out of range "
                        f"(allowed {allowed}; {bad.size} such line(s))")


def parse_key_list(path: str | Path, base: str | Path) -> ParsedList:
    """A list of keys (one relative path per line, no label), e.g. Clothing1M's ``*_key_list.txt``."""
    path = Path(path)
    arr = _read(path)
    starts, ends, line_no = _lines(arr)
    return ParsedList(path, PathTable(arr, starts, ends, Path(base)), np.full(starts.size, -1, np.int64), line_no)


def require_files(dataset: str, root: Path, relative: list[str], hint: str = "") -> None:
    """A UserError listing every expected file that is missing under ``root``."""
    missing = [name for name in relative if not (root / name).exists()]
    if missing:
        expected = ", ".join(str(root / name) for name in missing)
        raise UserError(f"{dataset}: expected {expected} (missing); pass --data-dir DIR pointing at the folder that "
                        f"holds {', '.join(relative)}{hint}")

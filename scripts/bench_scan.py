"""Benchmark: count a 2.4M-line WebVision training filelist (Google + Flickr) without opening an image.

Writes synthetic ``info/train_filelist_google.txt`` / ``info/train_filelist_flickr.txt`` in the real format
(``google/q0001/000001.jpg 0``; 1000 classes) into a temporary folder, then times
``create_dataset("webvision-full", root).class_counts()`` end to end. Target: median <= 3 s.

    python scripts/bench_scan.py [--lines 2400000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cmw_transfer.dataset import create_dataset

TARGET_S = 3.0
GOOGLE_SHARE = 0.41  # WebVision 1.0: ~0.98M Google + ~1.42M Flickr training images


def write_filelist(path: Path, source: str, labels: np.ndarray, start: int) -> None:
    """``source/qNNNN/NNNNNNNN.jpg label`` lines, one query folder per class like the real lists."""
    lines = [f"{source}/q{label + 1:04d}/{start + k:08d}.jpg {label}\n" for k, label in enumerate(labels.tolist())]
    path.write_text("".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_400_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    # Long-tailed class sizes like WebVision's (roughly 300..10000 per class).
    weights = np.exp(rng.normal(0.0, 0.8, size=1000))
    labels = rng.choice(1000, size=args.lines, p=weights / weights.sum())
    labels[:1000] = np.arange(1000)  # every class present
    n_google = int(args.lines * GOOGLE_SHARE)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "info").mkdir()
        t0 = time.perf_counter()
        write_filelist(root / "info" / "train_filelist_google.txt", "google", labels[:n_google], 0)
        write_filelist(root / "info" / "train_filelist_flickr.txt", "flickr", labels[n_google:], n_google)
        size_mb = sum(p.stat().st_size for p in (root / "info").iterdir()) / 1e6
        print(f"wrote {args.lines} lines ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ds = create_dataset("webvision-full", root, "train")
            counts = ds.class_counts()
            times.append(time.perf_counter() - t)
        if not np.array_equal(counts, np.bincount(labels, minlength=1000)) or len(ds) != args.lines:
            print("FAIL: counts differ from the generated labels")
            return 1
        median = statistics.median(times)
        print(f"scan + count of {len(ds)} lines, {ds.num_classes} classes: median {median:.3f} s over "
              f"{args.repeats} runs (min {min(times):.3f} s, max {max(times):.3f} s); target <= {TARGET_S:.1f} s")
        print(f"first path: {ds.path(0)}")
    print("PASS" if median <= TARGET_S else "FAIL")
    return 0 if median <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())

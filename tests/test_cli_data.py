"""``cmw-transfer data``: text/JSON output, the plot, and bad input -> exit 2 with one ``error:`` line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cmw_transfer.cli import main
from tests.fixtures_data import write_webvision


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["data", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_json_for_the_digits_pmd_source(capsys):
    code, out, _ = run(capsys, "--dataset", "digits-pmd", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["num_samples"] == 1347 and info["num_classes"] == 10
    assert sum(info["class_counts"]) == 1347
    assert 0.40 < info["noise_rate"] < 0.47
    assert info["bias"] == "pmd1:0.35+asym:0.3"
    assert [s["step"] for s in info["bias_steps"]] == ["pmd1:0.35", "asym:0.3"]
    centers = [f["center"] for f in info["families"]]
    assert centers == sorted(centers) and len(centers) == 3
    counts, family = np.array(info["class_counts"]), np.array(info["family_of_class"])
    nearest = np.abs(counts[:, None] - np.array(centers)[None, :]).argmin(axis=1)
    assert np.array_equal(family, nearest)
    assert sum(f["num_classes"] for f in info["families"]) == 10


def test_text_output_noise_and_imbalance_with_plot(capsys, tmp_path):
    plot = tmp_path / "sizes.png"
    code, out, _ = run(capsys, "--dataset", "digits", "--noise", "sym:0.2", "--imbalance", "10",
                       "--families", "2", "--plot", str(plot), "--seed", "1")
    assert code == 0
    assert "bias:        sym:0.2 + imbalance:10" in out
    assert "noise rate:  " in out and "head 1  size-rank-1" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = [int(line.split()[2]) for line in out.splitlines() if line.startswith("    ") and "size-rank" in line]
    assert len(counts) == 10


def test_web_data_has_unknown_noise(capsys, tmp_path):
    write_webvision(tmp_path)
    code, out, _ = run(capsys, "--dataset", "mini-webvision", "--data-dir", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["noise_rate"] is None and info["class_counts"] == [2] * 50
    code, out, _ = run(capsys, "--dataset", "webvision-full", "--data-dir", str(tmp_path))
    assert code == 0 and "unknown (no ground truth)" in out and "class counts: min 3, median 3, max 3" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "emnist"], "unknown dataset 'emnist'; known: digits"),
    (["--dataset", "digits", "--noise", "sym:1.5"], r"in [0, 1)"),
    (["--dataset", "digits", "--imbalance", "0.5"], "0.5 is not in the range x>=1.0"),
    (["--dataset", "webvision-full"], "needs --data-dir"),
    (["--dataset", "digits", "--families", "0"], "'--families': 0 is not in the range 1<=x<=100"),
])
def test_bad_input_exits_2_with_one_error_line(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_missing_root_as_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cmw_transfer", "data", "--dataset", "clothing1m",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: clothing1m: expected ") and "noisy_label_kv.txt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

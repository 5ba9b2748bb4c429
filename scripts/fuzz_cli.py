"""Replay a catalogue of bad and hostile inputs against the real ``cmw-transfer`` CLI, one subprocess each.

Every bad input must end with exactly one ``error: ...`` line on stderr and exit code 2 (no traceback, no
"this is a bug"); a few hostile-but-valid inputs have a documented outcome instead (exit 0, output checked).
Prints one line per case and the pass/fail/skip counts; exits 1 if any case fails.

    python scripts/fuzz_cli.py              # the whole catalogue (minutes: some cases train one tiny epoch)
    python scripts/fuzz_cli.py --fast       # the subset that fails at parse or list time (CI, < 1 min)
    python scripts/fuzz_cli.py -k lr -v     # cases whose id contains "lr", with their stderr
    python scripts/fuzz_cli.py --list       # the catalogue, without running it

Cases that need a small tmpfs (full disk, read-only mount) run only where ``mount -t tmpfs`` works (root), and
those that need a device node only where ``mknod`` works (root); elsewhere they are reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_hostile  # noqa: E402  (the fixtures of the issue-22 block)

TINY_APPLY = ("apply", "--dataset", "digits", "--weighting", "none", "--model", "small_cnn", "--epochs", "1",
              "--workers", "0", "--no-progress", "--device", "cpu")
TINY_METATRAIN = ("metatrain", "--src", "digits-pmd", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
                  "--device", "cpu", "--quiet")


@dataclass(frozen=True)
class Case:
    """One command line. ``{ws}`` in an argument is the scratch workspace with the fixtures."""

    id: str
    args: tuple[str, ...]
    expect: str = "error"  # "error": exit 2 + one error line; "ok": exit 0
    match: str = ""  # must appear in the error line ("error") or in stdout ("ok")
    warn: str = ""  # must appear in a "warning: " line on stderr
    forbid: tuple[str, ...] = ()  # must not appear in stdout or stderr
    fast: bool = False  # in the --fast subset
    item: str = ""  # where the case comes from (issue item), for the report
    needs: str = ""  # "tmpfs": needs the small file systems; "mknod": a device node (both root only)
    only_line: bool = True  # the error line is the only stderr line (else: the last one, after progress lines)
    timeout: int = 300
    env: tuple[tuple[str, str], ...] = ()  # extra environment ({hang}: a local server that never answers)


def _apply(*extra: str) -> tuple[str, ...]:
    return (*TINY_APPLY, "--out", "{ws}/runs/{case}", *extra)


def _opt(option: str, value: str, *, fast: bool = False, item: str = "9", cmd: str = "apply") -> Case:
    base = _apply() if cmd == "apply" else (*TINY_METATRAIN, "--out", "{ws}/runs/{case}")
    if cmd == "data":
        base = ("data", "--dataset", "digits")
    return Case(f"{cmd}{option}={value}", (*base, option, value), match=f"'{option}'", fast=fast, item=item)


def _machine_limit(kind: str) -> int:
    sys.path.insert(0, str(ROOT))
    from cmw_transfer.cli.options import machine_limit  # torch-free

    return machine_limit(kind)[0]


_PROBE = ("probe", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--quiet", "--out", "{ws}/runs/{case}")
_IMPORT = ("import", "--from", "official-cmwnet", "{ws}/nets/vnet.pth", "--out", "{ws}/runs/{case}")
_META = (*TINY_METATRAIN, "--out", "{ws}/runs/{case}")
_HUB_ENV = (("HF_HUB_OFFLINE", "0"), ("HF_HUB_CACHE", "{ws}/hfcache"))


CATALOGUE: tuple[Case, ...] = (
    # -- numeric and device options: refused while parsing, before any data or model is loaded (items 8, 9)
    _opt("--lr", "nan", fast=True), _opt("--lr", "inf"), _opt("--lr", "-inf"), _opt("--lr", "1e308", fast=True),
    _opt("--lr", "0"), _opt("--lr", "abc"), _opt("--momentum", "nan"), _opt("--momentum", "1"),
    _opt("--weight-decay", "-1"), _opt("--focal-gamma", "nan"), _opt("--focal-gamma", "-1"),
    _opt("--cb-beta", "1.5"), _opt("--cb-beta", "nan"), _opt("--mixup-alpha", "nan"),
    _opt("--teacher-decay", "2"), _opt("--imbalance", "nan"), _opt("--imbalance", "0.5"),
    _opt("--seed", str(2**63), fast=True), _opt("--seed", "-1"), _opt("--seed", "1" + "0" * 40),
    _opt("--img-size", "0"), _opt("--img-size", "-5"), _opt("--img-size", "100000", fast=True, item="10"),
    _opt("--device", "meta", fast=True), _opt("--device", "garbage"), _opt("--device", "cuda:99999"),
    _opt("--epochs", "0"), _opt("--epochs", "-3"), _opt("--batch-size", "0"), _opt("--batch-size", str(2**40)),
    _opt("--workers", "-1"), _opt("--eval-every", "0"), _opt("--families", "0"), _opt("--families", str(10**9)),
    _opt("--nproc", "0"), _opt("--open-accept", "0"), _opt("--open-threshold", "-1"), _opt("--cosine-scale", "0"),
    _opt("--dcl-weight", "nan"), _opt("--oltr-stage1-epochs", "0"), _opt("--warmup-epochs", "-1"),
    _opt("--meta-lr", "nan", fast=True, cmd="metatrain"), _opt("--lr", "inf", cmd="metatrain"),
    _opt("--ema-decay", "2", cmd="metatrain"), _opt("--weight-decay", "-1", cmd="metatrain"),
    _opt("--mixup-alpha", "nan", cmd="metatrain"), _opt("--seed", "-1", cmd="metatrain"),
    _opt("--device", "meta", cmd="metatrain"), _opt("--hidden-size", "0", cmd="metatrain"),
    _opt("--meta-interval", "0", cmd="metatrain"), _opt("--epochs", "0", cmd="metatrain"),
    _opt("--seed", str(2**64), cmd="data"), _opt("--imbalance", "inf", cmd="data"),
    _opt("--families", str(10**12), fast=True, cmd="data"),
    # -- a step that cannot fit in memory: refused before any data is read (item 10)
    Case("apply-step-cannot-fit", _apply("--model", "resnet50", "--img-size", "1024", "--batch-size", "65536"),
         match="one training step of resnet50 at 3x1024x1024", fast=True, item="10"),
    Case("apply-step-cannot-fit-list-unread", _apply("--dataset", "list:{ws}/nope.txt", "--eval-dataset",
                                                     "list:{ws}/nope.txt", "--model", "resnet50", "--img-size",
                                                     "1024", "--batch-size", "65536"),
         match="--batch-size", item="10"),
    Case("metatrain-step-cannot-fit", (*TINY_METATRAIN, "--out", "{ws}/runs/{case}", "--src", "list:{ws}/nope.txt",
                                       "--eval-dataset", "list:{ws}/nope.txt", "--model", "resnet50",
                                       "--batch-size", "65536"), match="with 65636 samples", item="10"),
    # -- --nproc 2: the error once, last, exit 2, before any worker starts (item 8)
    Case("apply--nproc2--lr=nan", _apply("--nproc", "2", "--lr", "nan"), match="'--lr'", fast=True, item="8"),
    Case("apply--nproc2-unknown-dataset", (*_apply("--nproc", "2")[:2], "nope", *_apply("--nproc", "2")[3:]),
         match="unknown dataset 'nope'", fast=True, item="8"),
    Case("apply--nproc2-bad-noise", _apply("--nproc", "2", "--noise", "bogus:1"), match="noise", item="8"),
    Case("apply--nproc2-missing-weights", (*_apply("--nproc", "2")[:4], "cmw", *_apply("--nproc", "2")[5:],
                                           "--weights", "{ws}/nope"), match="nope", item="8"),
    Case("apply--nproc2-missing-list", _apply("--nproc", "2", "--dataset", "list:{ws}/nope.txt",
                                              "--eval-dataset", "digits"), match="nope.txt", item="8"),
    # -- list files (items 8, 17, 18)
    Case("data-list-label-999999999999999999", ("data", "--dataset", "list:{ws}/lists/huge_label.txt"),
         match="999999999999999999", fast=True, item="8"),
    Case("data-list-label-19-digits", ("data", "--dataset", "list:{ws}/lists/long_label.txt"), match="malformed",
         item="8"),
    Case("data-list-negative-label", ("data", "--dataset", "list:{ws}/lists/negative.txt"), match="-1"),
    Case("data-list-no-label", ("data", "--dataset", "list:{ws}/lists/no_label.txt"), match="malformed"),
    Case("data-list-empty-file", ("data", "--dataset", "list:{ws}/lists/empty.txt"), match="no 'relative/path"),
    Case("data-list-binary", ("data", "--dataset", "list:{ws}/lists/binary.txt"), match="malformed"),
    Case("data-list-utf16", ("data", "--dataset", "list:{ws}/lists/utf16.txt"), match="UTF-16", item="17"),
    Case("data-list-missing", ("data", "--dataset", "list:{ws}/lists/nope.txt"), match="not found"),
    Case("data-list-is-a-folder", ("data", "--dataset", "list:{ws}/lists"), match="not found"),
    Case("data-list-utf8-bom", ("data", "--dataset", "list:{ws}/lists/bom.txt", "--json"), expect="ok",
         match='"num_samples": 2', fast=True, item="17"),
    Case("data-webvision-empty-classes", ("data", "--dataset", "webvision-full", "--data-dir", "{ws}/webvision"),
         expect="ok", match="empty:       2 of 1000 classes have no samples (class 3, 17)", fast=True, item="18"),
    Case("apply-webvision-empty-classes", (*_apply("--weights", "{ws}/nets/good", "--img-size", "16")[:2],
                                           "mini-webvision", *_apply("--weights", "{ws}/nets/good",
                                                                     "--img-size", "16")[3:],
                                           "--data-dir", "{ws}/webvision", "--weighting", "cmw"),
         expect="ok", match="done: ", warn="2 of 50 classes have no samples (class 3, 17)", item="18"),
    Case("metatrain-webvision-empty-classes", (*TINY_METATRAIN[:2], "mini-webvision", *TINY_METATRAIN[3:],
                                               "--data-dir", "{ws}/webvision", "--meta-set", "lowest-loss:1",
                                               "--batch-size", "16", "--meta-batch-size", "16",
                                               "--out", "{ws}/runs/{case}"),
         expect="ok", match="done: ", warn="2 of 50 classes have no samples (class 3, 17)", item="18",
         timeout=600),  # file images go through timm's 224-px transform: the slowest case
    Case("apply-list-bad-label", _apply("--dataset", "list:{ws}/lists/no_label.txt", "--eval-dataset",
                                        "list:{ws}/lists/no_label.txt"), match="malformed", fast=True, item="18"),
    Case("apply-list-huge-label", _apply("--dataset", "list:{ws}/lists/huge_label.txt", "--eval-dataset",
                                         "list:{ws}/lists/huge_label.txt"), match="out of range", item="18"),
    Case("data-list-control-chars-in-line", ("data", "--dataset", "list:{ws}/lists/ansi_line.txt"),
         match="malformed", forbid=("\x1b",), item="15"),
    # -- unwritable or full outputs (item 11)
    Case("data--plot-under-proc", ("data", "--dataset", "digits", "--plot", "/proc/cmw-fuzz/x.png"),
         match="/proc/cmw-fuzz/x.png", fast=True, item="11"),
    Case("data--plot-under-a-file", ("data", "--dataset", "digits", "--plot", "{ws}/afile/x.png"),
         match="afile", item="11"),
    Case("inspect--plot-under-proc", ("inspect", "--weights", "{ws}/nets/good", "--plot", "/proc/cmw-fuzz.png"),
         match="/proc/cmw-fuzz.png", item="11"),
    Case("apply--out-under-proc", (*_apply()[:-2], "--out", "/proc/cmw-fuzz-run"), match="/proc/cmw-fuzz-run",
         only_line=False, item="11"),
    Case("metatrain--out-under-proc", (*TINY_METATRAIN, "--out", "/proc/cmw-fuzz-meta"), match="/proc/cmw-fuzz-meta",
         only_line=False, item="11"),
    Case("data--plot-read-only", ("data", "--dataset", "digits", "--plot", "{ro}/x.png"), match="Read-only",
         needs="tmpfs", item="11"),
    Case("data--plot-full-disk", ("data", "--dataset", "digits", "--plot", "{full}/x.png"),
         match="No space left on device", needs="tmpfs", item="11"),
    Case("inspect--plot-full-disk", ("inspect", "--weights", "{ws}/nets/good", "--plot", "{full}/c.png"),
         match="No space left on device", needs="tmpfs", item="11"),
    Case("apply--out-read-only", (*_apply()[:-2], "--out", "{ro}/run"), match="Read-only", needs="tmpfs",
         only_line=False, item="11"),
    Case("apply--out-full-disk-torch.save", (*_apply()[:-2], "--out", "{small}/run"),
         match="No space left on device", needs="tmpfs", only_line=False, item="11"),
    # -- untrusted artifact text (item 15)
    Case("inspect-ansi-provenance", ("inspect", "--weights", "{ws}/nets/ansi"), expect="ok",
         match="\\x1b[2J", forbid=("\x1b", "\nforged: "), item="15"),
    # -- malformed artifacts (item 8: provenance and config.json of the wrong type)
    *(Case(f"inspect-provenance-{kind}", ("inspect", "--weights", f"{{ws}}/nets/prov_{kind}"), match="provenance",
           item="8") for kind in ("str", "int", "list")),
    *(Case(f"inspect-config.json-{kind}", ("inspect", "--weights", f"{{ws}}/nets/cfg_{kind}"), match="config.json",
           item="8") for kind in ("5", "null", "true", "str", "not-utf8")),
    # -- run directories given as --out (item 2, 8)
    Case("apply--out-is-a-file", (*_apply()[:-2], "--out", "{ws}/afile"), match="afile", only_line=False, item="8"),
    Case("apply--out-under-a-file", (*_apply()[:-2], "--out", "{ws}/afile/run"), match="afile", only_line=False,
         item="8"),
    Case("apply--out-empty", (*_apply()[:-2], "--out", ""), match="--out", only_line=False, item="2"),
    # -- a model that cannot take the input (item 8)
    Case("apply-vit-on-8x8", _apply("--model", "vit_tiny_patch16_224"), match="vit_tiny_patch16_224",
         only_line=False, item="8"),
    # == issue 22, items 5, 7, 9: numbers bounded by the machine before any work, lists and digits parsed strictly,
    # refusals that name the changed option, an unreachable Hub in seconds, one families note, a missing list file
    # item 5: every numeric option bounded by what the machine can do, before any work
    Case("probe--epochs=1e12", (*_PROBE, "--epochs", "1000000000000"), match="'--epochs'", fast=True, item="22.5"),
    Case("probe--seed=-1", (*_PROBE, "--seed", "-1"), match="'--seed'", fast=True, item="22.5"),
    Case("probe--batch-size=2^40", (*_PROBE, "--batch-size", str(2**40)), match="'--batch-size'", item="22.5"),
    Case("probe-curves-exceed-free-disk", (*_PROBE[:-1], "{small}/probe", "--epochs", "100"),
         match="lower --epochs or free space", needs="tmpfs", item="22.5"),
    Case("probe-step-cannot-fit", (*_PROBE[:2], "list:{ws}/lists/odd_sizes.txt", *_PROBE[3:], "--model", "resnet50",
                                   "--batch-size", "65536"), match="one training step of resnet50", item="22.5"),
    Case("import--calibrate-img-size=0", (*_IMPORT, "--calibrate-on", "digits", "--calibrate-img-size", "0"),
         match="'--calibrate-img-size'", fast=True, item="22.5"),
    Case("import--calibrate-epochs=0", (*_IMPORT, "--calibrate-on", "digits", "--calibrate-epochs", "0"),
         match="'--calibrate-epochs'", item="22.5"),
    Case("import-calibrate-vit-on-8x8", (*_IMPORT, "--calibrate-on", "digits", "--calibrate-model",
                                         "vit_tiny_patch16_224", "--calibrate-img-size", "8"),
         match="cannot take 3x8x8 inputs", item="22.5"),
    Case("apply--workers-beyond-machine", _apply("--workers", str(_machine_limit("workers") + 1)),
         match="more than this machine can run", fast=True, item="22.5"),
    Case("apply--threads-beyond-machine", _apply("--threads", str(_machine_limit("threads") + 1)),
         match="more than this machine can run", item="22.5"),
    Case("apply--nproc-beyond-machine", _apply("--nproc", str(_machine_limit("processes") + 1)),
         match="more than this machine can run", item="22.5"),
    Case("apply--config-with-subnormal-lr", _apply("--config", "{ws}/configs/subnormal_lr.json"),
         match="subnormal_lr.json: lr", item="22.5"),
    # item 7: lists parsed strictly, ASCII digits only
    Case("apply--open-classes=,", _apply("--open-classes", ","), match="names nothing", fast=True, item="22.7"),
    Case("apply--open-classes=1,,2", _apply("--open-classes", "1,,2"), match="item 2 is empty", fast=True,
         item="22.7"),
    Case("apply--open-classes=2,1", _apply("--open-classes", "2,1"), match="increasing order", item="22.7"),
    Case("apply--decay-milestones=5,2", _apply("--sched", "multistep", "--decay-milestones", "5,2"),
         match="increasing order", fast=True, item="22.7"),
    Case("apply--epochs=arabic-indic-3", _apply("--epochs", "\u0663"), match="digits 0-9", fast=True, item="22.7"),
    Case("metatrain--noise=sym:arabic-indic-0.4", (*_META, "--noise", "sym:\u0660.\u0664"), match="digits 0-9",
         item="22.7"),
    Case("metatrain--meta-set=clean:superscript-2", (*_META, "--meta-set", "clean:\u00b2"), match="clean:N",
         item="22.7"),
    Case("metatrain--meta-grad=skip:arabic-indic-3", (*_META, "--meta-grad", "skip:\u0663"), match="skip:N",
         item="22.7"),
    Case("data--noise=sym:arabic-indic-0.4", ("data", "--dataset", "digits", "--noise", "sym:\u0660.\u0664"),
         match="digits 0-9", item="22.7"),
    Case("import--source-counts=0,0,0", (*_IMPORT, "--source-counts", "0,0,0"), match="--source-counts",
         item="22.7"),
    Case("import--head-order=1,2,arabic-indic-0", (*_IMPORT, "--head-order", "1,2,\u0660"), match="digits 0-9",
         item="22.7"),
    # item 9: refusals that say what is wrong, in seconds
    Case("apply--log=''", _apply("--log", ""), match="names nothing", fast=True, item="22.9"),
    Case("metatrain--log=,", (*_META, "--log", ","), match="names nothing", item="22.9"),
    Case("apply--lr=1e-320", _apply("--lr", "1e-320"), match="too small", fast=True, item="22.9"),
    Case("metatrain--meta-lr=1e-320", (*_META, "--meta-lr", "1e-320"), match="too small", item="22.9"),
    Case("apply--resume-names-the-changed-option", (*TINY_APPLY, "--out", "{ws}/resume_run", "--resume", "--lr",
                                                   "0.5"), match="--lr 0.1 -> 0.5", item="22.9"),
    Case("inspect-hub-closed-port", ("inspect", "--weights", "hub:org/missing"), match="cannot be reached",
         env=(*_HUB_ENV, ("HF_ENDPOINT", "http://127.0.0.1:1")), timeout=90, item="22.9"),
    Case("inspect-hub-silent-server", ("inspect", "--weights", "hub:org/missing"), match="did not answer within",
         env=(*_HUB_ENV, ("HF_ENDPOINT", "{hang}")), timeout=90, item="22.9"),  # was minutes of retries
    Case("data-odd-list-one-families-note", ("data", "--dataset", "list:{ws}/lists/odd_sizes.txt"), expect="ok",
         match="classes use heads [1]", forbid=("placed on heads",), item="22.9"),
    Case("metatrain-missing-list-is-not-found", (*_META[:2], "list:{ws}/lists/nope.txt", *_META[3:]),
         match="nope.txt not found", item="22.9"),
    # == issue 22 (security): no code runs from data, no write replaces what is not a file, every hostile file is
    # one line. Fixtures: scripts/fuzz_hostile.py; a payload prints PWNED-<kind> if it ever runs.
    # -- a pickle payload in each CIFAR file kind, through data / metatrain / apply (22.1)
    *(Case(f"data-cifar-payload-{kind}", ("data", "--dataset", dataset, "--data-dir", f"{{ws}}/cifar/{kind}",
                                          "--split", "test" if file in ("test", "test_batch") else "train"),
           match=f"{file}: refused to load it", forbid=(fuzz_hostile.MARK,), fast=True, item="22.1")
      for kind, (dataset, _, file) in fuzz_hostile.CIFAR_KINDS.items()),
    Case("metatrain-cifar10-pmd-payload", (*TINY_METATRAIN[:2], "cifar10-pmd", *TINY_METATRAIN[3:], "--data-dir",
                                           "{ws}/cifar/c10-train", "--out", "{ws}/runs/{case}"),
         match="data_batch_1: refused to load it", forbid=(fuzz_hostile.MARK,), fast=True, item="22.1"),
    Case("apply-cifar10-payload-test-batch", (*_apply()[:2], "cifar10", *_apply()[3:], "--data-dir",
                                              "{ws}/cifar/c10-test"),
         match="test_batch: refused to load it", forbid=(fuzz_hostile.MARK,), fast=True, item="22.1"),
    Case("data-cifar-string-labels", ("data", "--dataset", "cifar10", "--data-dir", "{ws}/cifar/c10-str-labels"),
         match="data_batch_2: b'labels' must be a list of integer labels", item="22.6"),
    # -- an output that is a device node or a FIFO: refused, left as it is (22.2)
    Case("data--plot-device-node", ("data", "--dataset", "digits", "--plot", "{dev}"), match="a character device",
         fast=True, needs="mknod", item="22.2"),
    Case("inspect--plot-device-node", ("inspect", "--weights", "{ws}/nets/good", "--plot", "{dev}"),
         match="a character device", fast=True, needs="mknod", item="22.2"),
    Case("data--plot-fifo", ("data", "--dataset", "digits", "--plot", "{fifo}"), match="a FIFO", item="22.2"),
    Case("inspect--plot-fifo", ("inspect", "--weights", "{ws}/nets/good", "--plot", "{fifo}"), match="a FIFO",
         item="22.2"),
    Case("apply--out-file-is-a-fifo", (*_apply()[:-2], "--out", "{ws}/fifo_run", "--overwrite"),
         match="fifo_run/config.json: it is a FIFO", only_line=False, item="22.2"),
    Case("apply--out-file-is-a-device", (*_apply()[:-2], "--out", "{ws}/dev_run", "--overwrite"),
         match="dev_run/config.json: it is a character device", only_line=False, needs="mknod", item="22.2"),
    # -- nesting and size in artifact metadata; one safetensors reader (22.3, 22.4)
    Case("inspect-deep-provenance", ("inspect", "--weights", "{ws}/nets/deep_provenance"),
         match="nested deeper than 64 levels", item="22.3"),
    Case("inspect-deep-header", ("inspect", "--weights", "{ws}/nets/deep_header"), match="nested deeper than 64",
         item="22.3"),
    Case("inspect-deep-config.json", ("inspect", "--weights", "{ws}/nets/deep_config_json"),
         match="config.json is not valid JSON (nested deeper", item="22.3"),
    Case("apply-weights-deep-provenance", _apply("--weighting", "cmw", "--weights", "{ws}/nets/deep_provenance"),
         match="nested deeper than 64 levels", item="22.3"),
    Case("inspect-1MB-provenance", ("inspect", "--weights", "{ws}/nets/long_provenance"), expect="ok",
         match="... (1000000 characters)", forbid=("n" * 300,), item="22.3"),
    Case("inspect-header-2^62", ("inspect", "--weights", "{ws}/nets/huge_header"),
         match="header claims 4611686018427387904 bytes", item="22.4"),
    Case("apply--initial-checkpoint-header-2^62", _apply("--initial-checkpoint",
                                                         "{ws}/nets/huge_header/model.safetensors"),
         match="header claims 4611686018427387904 bytes", item="22.4"),
    # -- torch's "Detected pickle protocol 4" warning before the error line (22.8)
    Case("import-pickle-protocol-4", ("import", "--from", "official-cmwnet", "{ws}/evil.pkl", "--out",
                                      "{ws}/runs/{case}"), match="refused to load", forbid=(fuzz_hostile.MARK,),
         item="22.8"),
    Case("apply--initial-checkpoint-pickle-protocol-4", _apply("--initial-checkpoint", "{ws}/evil.pkl"),
         match="does not load into", forbid=(fuzz_hostile.MARK,), item="22.8"),
)


# -- fixtures ----------------------------------------------------------------------------------------------------
def _write_lists(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "huge_label.txt").write_text("a.png 0\nb.png 999999999999999999\n")
    (folder / "long_label.txt").write_text("a.png 0\nb.png 9999999999999999999999\n")
    (folder / "negative.txt").write_text("a.png 0\nb.png -1\n")
    (folder / "no_label.txt").write_text("a.png 0\nb.png\n")
    (folder / "empty.txt").write_text("\n\n")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "utf16.txt").write_text("a.png 0\nb.png 1\n", encoding="utf-16")
    (folder / "bom.txt").write_bytes(b"\xef\xbb\xbfa.png 0\nb.png 1\n")
    (folder / "ansi_line.txt").write_bytes(b"a.png 0\n\x1b[2Jforged\n")
    # three classes of 10, 10 and 11 samples: fewer distinct sizes than heads, all within 1.5x (one family)
    (folder / "odd_sizes.txt").write_text("".join(f"{c}/{i}.png {c}\n" for c, n in enumerate((10, 10, 11))
                                                  for i in range(n)))


def _write_webvision(root: Path, empty: tuple[int, ...] = (3, 17)) -> None:
    """A WebVision 1.0 layout whose 1,000-class lists leave ``empty`` classes without a line; the images of
    mini-webvision's 50 classes exist (8x8 PNGs), so a tiny run can train on it."""
    from PIL import Image

    (root / "info").mkdir(parents=True)
    rows = [(f"google/q{c:04d}/{k}.jpg", c) for c in range(1000) if c not in empty for k in range(2)]
    (root / "info" / "train_filelist_google.txt").write_text("".join(f"{p} {c}\n" for p, c in rows))
    (root / "info" / "train_filelist_flickr.txt").write_text("flickr/q0000/0.jpg 0\n")
    (root / "info" / "val_filelist.txt").write_text("".join(f"{c}.jpg {c}\n" for c in range(1000)))
    images = [(root / p, c) for p, c in rows if c < 50] + [(root / "val_images_256" / f"{c}.jpg", c)
                                                           for c in range(50)]
    for path, c in images:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (5 * c, 255 - 5 * c, 128)).save(path, format="PNG")


def _rewrite_config(weights: Path, edit) -> None:
    """Change the config JSON inside a safetensors header (the length prefix is recomputed)."""
    blob = weights.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    key = "cmw_transfer.config"
    config = json.loads(header["__metadata__"][key])
    edit(config)
    header["__metadata__"][key] = json.dumps(config)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size:])


def _write_nets(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from cmw_transfer.artifact.net import CMWNet

    torch.manual_seed(0)
    net = CMWNet(hidden_size=8, num_heads=3).with_scales([10.0, 40.0, 90.0], {"min": 0.0, "p50": 0.7, "max": 8.0})
    net.provenance = {"source": "digits-pmd"}
    net.save_pretrained(folder / "good")

    def variant(name: str, edit=None, config_json: bytes | None = None) -> None:
        shutil.copytree(folder / "good", folder / name)
        if edit is not None:
            _rewrite_config(folder / name / "model.safetensors", edit)
            (folder / name / "config.json").unlink()
        if config_json is not None:
            (folder / name / "config.json").write_bytes(config_json)

    variant("ansi", lambda c: c.update(provenance={"source": "\x1b[2J\x1b[31mred", "note": "x\nforged: line"}))
    variant("prov_str", lambda c: c.update(provenance="just a string"))
    variant("prov_int", lambda c: c.update(provenance=5))
    variant("prov_list", lambda c: c.update(provenance=["a", "b"]))
    for kind, text in (("5", b"5"), ("null", b"null"), ("true", b"true"), ("str", b'"a string"'),
                       ("not-utf8", b'{"hidden_size": 8, "x": "\xff\xfe"}')):
        variant(f"cfg_{kind}", config_json=text)
    # the authors' released layout (CMW-Net's VNet: `feature` trunk, three `classfier` heads), for `import`
    hidden = 100
    state = {"feature.layer.0.weight": torch.randn(hidden, 1), "feature.layer.0.bias": torch.randn(hidden)}
    for head in range(3):
        state[f"classfier.layers.{head}.0.weight"] = torch.randn(1, hidden) / 10
        state[f"classfier.layers.{head}.0.bias"] = torch.randn(1)
    torch.save(state, folder / "vnet.pth")


def _write_resume_run(folder: Path) -> None:
    """An apply run directory of TINY_APPLY at the default --lr: its config.json and a checkpoint that names only
    the fingerprint (the resume is refused before anything else of it is read)."""
    import torch

    from cmw_transfer.trainer.config import ApplyConfig

    cfg = ApplyConfig(dataset="digits", out=str(folder), weighting="none", model="small_cnn", epochs=1, workers=0,
                      progress=False, device="cpu")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**cfg.to_dict(), "fingerprint": cfg.fingerprint()}))
    torch.save({"fingerprint": cfg.fingerprint(), "epoch": 1}, folder / "checkpoint.pt")


@contextlib.contextmanager
def _silent_server() -> Iterator[str]:
    """A local socket that accepts connections and never answers (a Hub that hangs); its URL."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    stop, held = threading.Event(), []

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *options: str) -> Iterator[bool]:
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((*options, f"size={size}")), "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path / "filler", "wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


@contextlib.contextmanager
def workspace(need_tmpfs: bool) -> Iterator[dict[str, str]]:
    """The fixtures every case refers to, in a temporary folder; small file systems mounted where allowed."""
    with tempfile.TemporaryDirectory(prefix="cmw-fuzz-") as tmp:
        ws = Path(tmp)
        _write_lists(ws / "lists")
        _write_webvision(ws / "webvision")
        _write_nets(ws / "nets")
        (ws / "afile").write_text("a regular file\n")
        (ws / "runs").mkdir()
        (ws / "cwd").mkdir()
        (ws / "hfcache").mkdir()
        (ws / "configs").mkdir()
        (ws / "configs" / "subnormal_lr.json").write_text('{"dataset": "digits", "out": "x", "lr": 1e-320}')
        _write_resume_run(ws / "resume_run")
        hostile = fuzz_hostile.write(ws)
        with contextlib.ExitStack() as stack:
            places = {"ws": str(ws), "ro": "", "full": "", "small": "", **hostile,
                      "hang": stack.enter_context(_silent_server())}
            if need_tmpfs:
                ok = [stack.enter_context(_tmpfs(ws / "ro", "64k", "ro")),
                      stack.enter_context(_tmpfs(ws / "full", "64k")),
                      stack.enter_context(_tmpfs(ws / "small", "64k"))]
                if all(ok):
                    _fill(ws / "full")
                    places.update(ro=str(ws / "ro"), full=str(ws / "full"), small=str(ws / "small"))
            yield places


# -- running and judging -----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: str  # PASS, FAIL, SKIP
    reason: str
    seconds: float
    stderr: str = ""


def judge(case: Case, rc: int, out: str, err: str) -> str:
    """Empty string when the outcome is the documented one, else what is wrong."""
    lines = [line for line in err.splitlines() if line.strip()]
    for text in case.forbid:
        if text in out or text in err:
            return f"output contains {text!r}"
    if "Traceback" in err or "this is a bug" in err:
        return f"exit {rc} with a traceback / 'bug' line"
    if case.warn and not any(line.startswith("warning: ") and case.warn in line for line in lines):
        return f"no warning line with {case.warn!r}"
    if case.expect == "ok":
        if rc != 0:
            return f"exit {rc}, expected 0 ({lines[-1] if lines else 'no stderr'})"
        return "" if case.match in out else f"stdout lacks {case.match!r}"
    errors = [line for line in lines if line.startswith("error: ")]
    if rc != 2:
        return f"exit {rc}, expected 2 ({lines[-1][:150] if lines else 'no stderr'})"
    if len(errors) != 1:
        return f"{len(errors)} error lines, expected 1"
    if lines[-1] != errors[0]:
        return "the error line is not the last stderr line"
    if case.only_line and len(lines) != 1:
        return f"{len(lines)} stderr lines, expected only the error line"
    if case.match not in errors[0]:
        return f"error line lacks {case.match!r}: {errors[0][:150]}"
    return ""


def run_case(case: Case, places: dict[str, str]) -> Outcome:
    if case.needs == "tmpfs" and not places["ro"]:
        return Outcome(case, "SKIP", "no tmpfs (mount -t tmpfs needs root)", 0.0)
    if case.needs == "mknod" and not places["dev"]:
        return Outcome(case, "SKIP", "no device node (mknod needs root)", 0.0)
    args = [arg.format(**places, case="".join(ch if ch.isalnum() else "_" for ch in case.id)) for arg in case.args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "NO_COLOR": "1",
           **{key: value.format(**places) for key, value in case.env}}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "cmw_transfer", *args], capture_output=True, text=True,
                              errors="backslashreplace", env=env, cwd=Path(places["ws"]) / "cwd",
                              timeout=case.timeout)
    except subprocess.TimeoutExpired:
        return Outcome(case, "FAIL", f"timed out after {case.timeout}s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    problem = judge(case, proc.returncode, proc.stdout, proc.stderr)
    return Outcome(case, "FAIL" if problem else "PASS", problem, seconds, proc.stderr)


def select(fast: bool, pattern: str | None) -> list[Case]:
    return [c for c in CATALOGUE if (c.fast or not fast) and (pattern is None or pattern in c.id)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the parse/list-time subset (CI)")
    parser.add_argument("-k", dest="pattern", default=None, help="only cases whose id contains this")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the stderr of failed cases")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    args = parser.parse_args(argv)
    cases = select(args.fast, args.pattern)
    if args.list:
        for c in cases:
            print(f"{c.id:<44} item {c.item or '-':<3} {'fast' if c.fast else '    '} {' '.join(c.args)}")
        return 0
    start = time.perf_counter()
    with workspace(any(c.needs == "tmpfs" for c in cases)) as places, \
            ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = []
        for outcome in pool.map(lambda c: run_case(c, places), cases):
            outcomes.append(outcome)
            reason = f"  {outcome.reason}" if outcome.reason else ""
            print(f"{outcome.status} {outcome.case.id:<44} {outcome.seconds:5.1f}s{reason}", flush=True)
            if args.verbose and outcome.status == "FAIL":
                print("\n".join("    " + line[:200] for line in outcome.stderr.strip().splitlines()[-6:]))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{len(outcomes)} cases{' (--fast)' if args.fast else ''}: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped in {time.perf_counter() - start:.1f}s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Output files respect the umask; the per-process CPU policy (threads, DataLoader workers)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from cmw_transfer import runtime
from cmw_transfer.atomic import write_json, write_text
from cmw_transfer.errors import UserError
from tests.helpers import make_net


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_respect_the_umask(tmp_path, umask):
    umask(0o022)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"a": 1})
    make_net().save_pretrained(tmp_path / "net")
    files = [tmp_path / "a.txt", tmp_path / "b.json", *sorted((tmp_path / "net").iterdir())]
    assert {p.name: mode(p) for p in files} == {p.name: 0o644 for p in files}
    umask(0o077)
    write_text(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporaries left behind


def test_thread_policy(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert runtime.configure_threads() == 4  # 8 CPUs shared by 2 ranks on this machine
        assert runtime.configure_threads(world_size=8) == 1
        assert runtime.configure_threads(3) == 3  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert runtime.configure_threads() == 2  # the environment's choice is kept
        with pytest.raises(UserError, match="--threads"):
            runtime.configure_threads(0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("cpus", "ranks", "workers"), [(1, 1, 0), (2, 1, 1), (3, 1, 2), (16, 1, 4), (16, 8, 1),
                                                        (8, 2, 3)])
def test_default_workers(monkeypatch, cpus, ranks, workers):
    monkeypatch.setattr(runtime, "available_cpus", lambda: cpus)
    assert runtime.default_workers(ranks) == workers

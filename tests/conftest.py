"""Suite-wide setup."""

import huggingface_hub
import pytest
import torch

from tests.realdata import fashion_mnist_dir


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription stalls, and the
    exactness tests (resume, regeneration) need a fixed thread count anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode: hub specs resolve through huggingface_hub's real code path
    against files the test writes there, and nothing reaches the network."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def fashion_dir():
    """The real Fashion-MNIST folder; the test skips without it (fails under CMW_REQUIRE_REAL_DATA=1)."""
    return fashion_mnist_dir()


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading data, building a model or starting torchrun."""
    import cmw_transfer.cli.apply_cmd as apply_cmd_module
    import cmw_transfer.dataset.registry as registry
    import cmw_transfer.trainer.engine.launch as launch_mod
    import cmw_transfer.trainer.metatrain.stage as meta_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("reached data loading / training")

    monkeypatch.setattr(launch_mod, "run_stage", forbidden)
    monkeypatch.setattr(meta_mod.MetaTrainer, "__init__", forbidden)
    monkeypatch.setattr(registry, "create_dataset", forbidden)
    monkeypatch.setattr(apply_cmd_module, "run_under_torchrun", forbidden)

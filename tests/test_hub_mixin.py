"""CMWNet as a PyTorchModelHubMixin citizen: the mixin's own entry points, the network stubbed at HfApi (push) or
replaced by a local cache laid out as huggingface_hub writes it (load, HF_HUB_OFFLINE)."""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from cmw_transfer.artifact import fileformat
from cmw_transfer.artifact.net import CMWNet
from cmw_transfer.errors import UserError
from tests.helpers import make_net, run_cli
from tests.test_weights_spec import write_hub_cache


def cached_repo(cache, repo_id, net, commit="a" * 40):
    repo_dir = write_hub_cache(cache, repo_id, commit, net)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir / "snapshots" / commit


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi's two network calls replaced: what would be uploaded is recorded (file name -> bytes); the reachability
    probe answers "reachable"."""
    import cmw_transfer.weights.hub as weights_hub

    calls: dict = {"create_repo": [], "uploads": []}
    monkeypatch.setattr(weights_hub, "_probe", lambda endpoint: None)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        root = os.fspath(folder_path)
        names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
        kept = list(filter_repo_objects(names, allow_patterns=allow_patterns))
        files = {name: open(os.path.join(root, name), "rb").read() for name in kept}
        calls["uploads"].append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return calls


# -- save_pretrained / push_to_hub through the mixin's signatures ---------------------------------------------------
def test_save_pretrained_with_extra_config(tmp_path):
    net = make_net()
    net.save_pretrained(tmp_path / "n", config={"notes": "trained for the wiki"})
    side = json.loads((tmp_path / "n" / "config.json").read_text())
    assert side["notes"] == "trained for the wiki" and side["centers"] == net.centers
    loaded = CMWNet.from_pretrained(tmp_path / "n")  # extra keys do not disturb loading
    assert torch.equal(loaded.trunk.weight, net.trunk.weight)
    with pytest.raises(ValueError, match="contradict"):
        net.save_pretrained(tmp_path / "m", config={"num_heads": 7})


def test_save_pretrained_keeps_a_hand_edited_card(tmp_path):
    net = make_net()
    net.save_pretrained(tmp_path / "n")
    (tmp_path / "n" / "README.md").write_text("# my notes\n")
    make_net(seed=5).save_pretrained(tmp_path / "n")
    assert (tmp_path / "n" / "README.md").read_text() == "# my notes\n"
    assert torch.equal(CMWNet.from_pretrained(tmp_path / "n").trunk.weight, make_net(seed=5).trunk.weight)


def test_push_to_hub_uploads_the_artifact_files_only(fake_hub):
    net = make_net()
    net.provenance = {"source": "digits-pmd", "method": "cmwnet"}
    url = net.push_to_hub("me/x", config={"notes": "n"})
    assert url.startswith("https://huggingface.co/me/x/commit/")
    assert [r for r, _ in fake_hub["create_repo"]] == ["me/x"]
    (upload,) = fake_hub["uploads"]
    assert sorted(upload["files"]) == sorted(fileformat.ARTIFACT_FILES)
    assert json.loads(upload["files"]["config.json"])["notes"] == "n"
    assert upload["files"]["curves.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert b"digits-pmd" in upload["files"]["README.md"]


def test_save_pretrained_push_to_hub(tmp_path, fake_hub):
    make_net().save_pretrained(tmp_path / "n", push_to_hub=True, repo_id="me/y")
    assert fake_hub["uploads"][0]["repo_id"] == "me/y"
    assert (tmp_path / "n" / "model.safetensors").is_file()


def test_push_without_token_or_offline_never_contacts_the_hub(fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # no stored token either
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
    with pytest.raises(UserError, match="no Hugging Face token.*hf auth login"):
        make_net().push_to_hub("me/x")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline"):
        make_net().push_to_hub("me/x")
    assert fake_hub["create_repo"] == [] and fake_hub["uploads"] == []


def test_push_with_no_network_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match="cannot be reached") as info:
        make_net().push_to_hub("me/x")
    assert "\n" not in str(info.value)


def test_cli_push_uploads_no_run_files(tmp_path, fake_hub, capsys):
    from tests.test_cli_inspect import _main

    make_net().save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"out": str(tmp_path)}))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    out = _main(capsys, "push", "--weights", str(tmp_path / "run"), "--repo", "me/z")
    assert out.returncode == 0, out.stderr
    assert sorted(fake_hub["uploads"][0]["files"]) == sorted(fileformat.ARTIFACT_FILES)


def test_cli_push_offline_and_no_network_exit_2(tmp_path):
    make_net().save_pretrained(tmp_path / "n")
    base = {**os.environ, "HF_TOKEN": "hf_test_token"}
    for env, needle in (({"HF_HUB_OFFLINE": "1"}, "offline"),
                        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached")):
        out = run_cli("push", "--weights", str(tmp_path / "n"), "--repo", "me/x", env={**base, **env})
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr
        assert "download" not in lines[0]


# -- from_pretrained: bare repo ids, hub: specs, revision, cache_dir ---------------------------------------------
def test_bare_repo_id_goes_to_the_hub_cache(offline_cache, tmp_path, monkeypatch):
    cached = make_net(seed=3)
    cached_repo(offline_cache, "org/name", cached)
    monkeypatch.chdir(tmp_path)
    assert torch.equal(CMWNet.from_pretrained("org/name").trunk.weight, cached.trunk.weight)
    local = make_net(seed=4)
    local.save_pretrained(tmp_path / "org" / "name")
    # a local path of that name wins for the bare id (the mixin's rule) but never for hub:
    assert torch.equal(CMWNet.from_pretrained("org/name").trunk.weight, local.trunk.weight)
    assert torch.equal(CMWNet.from_pretrained("hub:org/name").trunk.weight, cached.trunk.weight)


def test_hub_spec_never_reads_a_local_directory(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_net().save_pretrained(tmp_path / "org" / "only-local")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        CMWNet.from_pretrained("hub:org/only-local")


def test_revision_and_cache_dir_keywords(offline_cache, tmp_path):
    old, new = make_net(seed=1), make_net(seed=2)
    snap_old = cached_repo(offline_cache, "org/x", old, "1" * 40)
    cached_repo(offline_cache, "org/x", new, "2" * 40)
    assert snap_old.is_dir()
    assert torch.equal(CMWNet.from_pretrained("hub:org/x", revision="1" * 40).trunk.weight, old.trunk.weight)
    assert torch.equal(CMWNet.from_pretrained("org/x", revision="1" * 40).trunk.weight, old.trunk.weight)
    with pytest.raises(UserError, match="pins revision"):
        CMWNet.from_pretrained("hub:org/x@" + "1" * 40, revision="2" * 40)
    other = tmp_path / "other-cache"
    elsewhere = make_net(seed=9)
    cached_repo(other, "org/x", elsewhere)
    assert torch.equal(CMWNet.from_pretrained("hub:org/x", cache_dir=other).trunk.weight, elsewhere.trunk.weight)
    assert torch.equal(CMWNet.from_pretrained("hub:org/x").trunk.weight, new.trunk.weight)


# -- hostile config.json / provenance: one UserError, locally and in the hub cache ---------------------------------
BAD_CONFIGS = [b"5", b"null", b"true", b'"a string"', b"[1, 2]", b"\xff\xfe{}", b"{not json"]


@pytest.mark.parametrize("content", BAD_CONFIGS)
def test_bad_config_json_is_a_user_error(tmp_path, offline_cache, content):
    make_net().save_pretrained(tmp_path / "n")
    (tmp_path / "n" / "config.json").write_bytes(content)
    with pytest.raises(UserError, match="config.json"):
        CMWNet.from_pretrained(tmp_path / "n")
    snap = cached_repo(offline_cache, "org/bad", make_net())
    (snap / "config.json").write_bytes(content)
    with pytest.raises(UserError, match="config.json"):
        CMWNet.from_pretrained("hub:org/bad")


@pytest.mark.parametrize("provenance", ["a string", 5, [1, 2]])
def test_non_object_provenance_in_header_is_a_user_error(tmp_path, provenance):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    make_net().save_safetensors(path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    cfg = json.loads(meta[fileformat.CONFIG_KEY])
    cfg["provenance"] = provenance
    meta[fileformat.CONFIG_KEY] = json.dumps(cfg)
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(UserError, match="provenance must be a JSON object"):
        CMWNet.from_pretrained(path)
    if isinstance(provenance, str):  # the CLI once: one line, exit 2
        out = run_cli("inspect", "--weights", str(path))
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


# -- the model card -------------------------------------------------------------------------------------------------
def test_model_card_is_a_deterministic_hub_card(tmp_path):
    net = make_net()
    net.provenance = {"source": "digits-pmd", "method": "cmwnet", "bias": "pmd1:0.35"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"epoch": 3, "clean_noisy_auc": 0.8123,
                                                                   "test_top1": 71.5}) + "\n{torn")
        net.save_pretrained(tmp_path / name)
    text = (tmp_path / "a" / "README.md").read_bytes()
    assert text == (tmp_path / "b" / "README.md").read_bytes()
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.library_name == "cmw-transfer" and card.data.license == "mit"
    assert card.data.eval_results[0].metric_type == "roc_auc"
    assert card.data.eval_results[0].metric_value == pytest.approx(0.8123)
    body = card.text
    for needle in ("https://arxiv.org/abs/2202.05613", "cmw-transfer apply --weights", "CMWLoss.from_spec",
                   "![weight vs loss per family](curves.png)", "## Limitations", "@article{shu2023cmwnet",
                   "| clean_noisy_auc | 0.8123 |", "| large |"):
        assert needle in body, needle
    assert (tmp_path / "a" / "curves.png").is_file()


def test_shipped_cards_are_what_the_code_writes():
    """The shipped README.md of each net is exactly the card generated from its weights and its run's metrics."""
    from pathlib import Path

    from cmw_transfer.artifact import card

    shipped = sorted(p for p in (Path(__file__).resolve().parents[1] / "pretrained").iterdir()
                     if (p / "model.safetensors").is_file())
    assert len(shipped) >= 3
    for directory in shipped:
        net = CMWNet.from_pretrained(directory)
        expected = card.as_text(net.generate_model_card(metrics=card.final_metrics(directory)))
        assert (directory / "README.md").read_text(encoding="utf-8") == expected, directory.name


# -- layering ---------------------------------------------------------------------------------------------------
def test_no_import_cycles_in_artifact_and_weights():
    """Every import between modules of cmw_transfer (function-local ones too, TYPE_CHECKING ones not) forms a DAG,
    and artifact/net.py imports nothing else of the package."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "cmw_transfer"
    graph: dict[str, set[str]] = {}
    for sub in ("artifact", "weights"):
        for file in (root / sub).glob("*.py"):
            module = f"cmw_transfer.{sub}.{file.stem}".removesuffix(".__init__")
            tree = ast.parse(file.read_text())
            skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                    and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
            deps = set()
            for node in ast.walk(tree):
                if id(node) in skip:
                    continue
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmw_transfer."):
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("cmw_transfer."))
            graph[module] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    assert graph["cmw_transfer.artifact.net"] == set()
    for pkg in ("cmw_transfer.artifact", "cmw_transfer.weights"):  # the package __init__ sits on top
        for deps in graph.values():
            deps.discard(pkg)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])

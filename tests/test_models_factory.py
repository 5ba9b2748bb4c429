"""timm integration: model names, pretrained weights through the Hugging Face cache, initial checkpoints, and the
input geometry shared by model and transform."""

from __future__ import annotations

import pytest
import timm
import torch

from cmw_transfer.errors import UserError
from cmw_transfer.models import check_geometry, create_model, data_config, input_geometry, similar_models

TINY = "test_resnet"  # timm's test model: 0.5M parameters
HUB_ID = "timm/test_resnet.r160_in1k"


def test_model_name_suggestions():
    assert similar_models("resnet_18")[0] == "resnet18"
    with pytest.raises(UserError, match=r"unknown model 'resnet_18'.*similar: resnet18"):
        create_model("resnet_18", 10)


def populate(cache, repo_id: str, model: torch.nn.Module, commit: str = "c" * 40) -> None:
    """A timm repo as the Hub serves it (timm's own save_for_hf writes config.json + model.safetensors), laid out
    in the cache as huggingface_hub writes it."""
    from timm.models import save_for_hf

    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    save_for_hf(model, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


def test_pretrained_offline_without_cache_is_one_line(offline_cache):
    with pytest.raises(UserError, match="not in the local Hugging Face cache") as info:
        create_model(TINY, 10, pretrained=True)
    assert "\n" not in str(info.value) and "hf download timm/test_resnet" in str(info.value)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        create_model(f"hf-hub:{HUB_ID}", 10, pretrained=True)


def test_pretrained_from_a_populated_cache(offline_cache):
    torch.manual_seed(7)
    source = timm.create_model(TINY, pretrained=False)  # 1000 classes, as published
    populate(offline_cache, HUB_ID, source)
    for name in (TINY, f"hf-hub:{HUB_ID}"):
        model = create_model(name, 10, pretrained=True)
        assert torch.equal(model.conv1[0].weight, source.conv1[0].weight), name  # the backbone is the cached one
        assert model.get_classifier().out_features == 10  # the head is new, as timm does for num_classes


def test_builtin_has_no_pretrained():
    with pytest.raises(UserError, match="no pretrained weights"):
        create_model("small_cnn", 10, pretrained=True)


def test_initial_checkpoint_loads_weights_only(tmp_path):
    torch.manual_seed(3)
    trained = create_model("small_cnn", 10, in_chans=1)
    torch.save({"model": trained.state_dict(), "epoch": 4}, tmp_path / "checkpoint.pt")
    loaded = create_model("small_cnn", 10, in_chans=1, checkpoint_path=tmp_path / "checkpoint.pt")
    for (k, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="does not load into 'small_cnn'"):
        create_model("small_cnn", 7, in_chans=1, checkpoint_path=tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="no such file"):
        create_model("small_cnn", 10, checkpoint_path=tmp_path / "absent.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="does not load"):
        create_model("small_cnn", 10, checkpoint_path=tmp_path / "evil.pt")


def test_geometry_a_model_cannot_take_is_one_line():
    for name in ("convnext_atto", "vit_tiny_patch16_224"):
        with pytest.raises(UserError, match=r"cannot take 1x8x8 inputs.*--img-size") as info:
            create_model(name, 10, in_chans=1, input_size=(8, 8))
        assert "\n" not in str(info.value)
    create_model("small_cnn", 10, in_chans=1, input_size=(8, 8))  # made for them


def test_vit_on_digits_resized_one_step():
    """digits are 1 x 8 x 8; with --img-size 32 the timm transform emits RGB 32 x 32 and the ViT is built for it."""
    from timm.data import create_transform

    from cmw_transfer.dataset import create_dataset

    geometry = input_geometry((1, 8, 8), 32)
    assert geometry == (3, 32, 32) and input_geometry((1, 8, 8), None) == (1, 8, 8)
    model = create_model("test_vit", 10, in_chans=geometry[0], img_size=32)
    cfg = data_config(model, geometry)
    assert cfg["input_size"] == geometry and len(cfg["mean"]) == 3
    transform = create_transform(**{k: cfg[k] for k in ("input_size", "mean", "std", "interpolation",
                                                        "crop_pct")}, is_training=True)
    ds = create_dataset("digits", None, "train", transform=transform)
    x = torch.stack([ds[i][0] for i in range(4)])
    y = torch.as_tensor([int(ds[i][1]) for i in range(4)])
    assert tuple(x.shape[1:]) == geometry
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    check_geometry(model, geometry, "test_vit")
    assert model.training  # the dry forward restores the mode
    with pytest.raises(UserError, match="--img-size must be a positive"):
        input_geometry((1, 8, 8), 0)


def test_apply_cli_vit_on_resized_digits_and_a_model_too_big_for_8x8(tmp_path, capsys):
    import json

    from tests.helpers import call_main

    common = ["apply", "--weighting", "none", "--dataset", "digits", "--imbalance", "50", "--epochs", "1",
              "--batch-size", "32", "--workers", "0", "--no-progress", "--device", "cpu"]
    code, out, err = call_main([*common, "--model", "test_vit", "--img-size", "32", "--out", str(tmp_path / "vit"),
                                "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["model"] == "test_vit"
    code, out, err = call_main([*common, "--model", "convnext_atto", "--out", str(tmp_path / "cnx")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: model 'convnext_atto' cannot take 1x8x8 inputs"), err
    assert "--img-size" in lines[-1]


def test_metatrain_refuses_a_model_that_cannot_take_the_source_in_one_line_before_any_file(tmp_path, capsys):
    from tests.helpers import call_main

    out = tmp_path / "run"
    code, _, err = call_main(["metatrain", "--src", "digits-pmd", "--model", "convnext_atto", "--epochs", "1",
                              "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model 'convnext_atto' cannot take 1x8x8 inputs")
    assert "--img-size" not in lines[-1] and "small_cnn" in lines[-1]  # metatrain has no --img-size
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing to clean up: the same command can run again

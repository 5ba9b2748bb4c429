"""Advisor networks (MFRW / MES): the loss, the meta-gradient against finite differences and a deep-copy oracle,
where the mask applies, the stage end to end (export, resume), bad inputs."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from cmw_transfer.errors import UserError
from cmw_transfer.metrics import evaluate
from cmw_transfer.models import create_model
from cmw_transfer.models.builtin import SmallCNN
from cmw_transfer.trainer.config import MetaTrainConfig, parse_advisor
from cmw_transfer.trainer.meta.advisor import AdvisorNet, advisor_meta_gradient, make_split
from cmw_transfer.trainer.meta.metastep import VirtualStep, virtual_names
from cmw_transfer.weighting.eql import EQLWeighting, equalized_cross_entropy, rare_class_mask
from tests.faults import crash_at
from tests.helpers import call_main, launch
from tests.reference_advisor import deepcopy_advisor_meta_gradient, mes_ce


# -- the loss -----------------------------------------------------------------------------------------------------
def test_mes_with_zero_s_is_softmax_cross_entropy():
    torch.manual_seed(0)
    z, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 5, (7,))
    torch.testing.assert_close(equalized_cross_entropy(z, y, torch.zeros(7, 5, dtype=torch.float64)),
                               F.cross_entropy(z, y, reduction="none"))


def test_eql_matches_the_formula_on_a_hand_case():
    rare = rare_class_mask([100, 5, 50], threshold=0.1)  # frequencies 0.65, 0.03, 0.32
    assert rare.tolist() == [0.0, 1.0, 0.0]
    z = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    beta = torch.ones(2, 3, dtype=torch.float64)
    got = equalized_cross_entropy(z, y, beta * rare.double())
    # sample 0 (class 0): the rare class 1 leaves the denominator; sample 1 is of the rare class itself: plain CE
    want = torch.tensor([-1.0 + torch.log(torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(3.0))).item(),
                         F.cross_entropy(z[1:], y[1:]).item()], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    # a soft s: w_k = 1 - s_k (1 - y_k) on the hand case, and the reference written out
    s = torch.tensor([[0.3, 0.5, 0.2], [0.9, 0.1, 0.4]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.5, 0.8], [0.1, 1.0, 0.6]], dtype=torch.float64)
    hand = -z.gather(1, y[:, None])[:, 0] + torch.log((w * torch.exp(z)).sum(1))
    torch.testing.assert_close(equalized_cross_entropy(z, y, s), hand)
    torch.testing.assert_close(mes_ce(z, y, s), hand)


def test_eql_weighting_beta_draw_and_threshold():
    crit = EQLWeighting([100, 5, 50], threshold=0.1, rho=0.0)  # beta never fires: plain CE
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(crit.per_sample_loss(z, y), F.cross_entropy(z, y, reduction="none"))
    assert torch.equal(crit.weights(torch.rand(4), y), torch.ones(4))
    full = EQLWeighting([100, 5, 50], threshold=0.1, rho=1.0)
    assert (full.per_sample_loss(z, y) <= F.cross_entropy(z, y, reduction="none") + 1e-6).all()
    with pytest.raises(ValueError):
        EQLWeighting([1, 2], rho=1.5)


# -- the meta-gradient --------------------------------------------------------------------------------------------
@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = SmallCNN(4, in_chans=1, width=8).double()
    advisor = AdvisorNet(16, 4, embed=6).double()
    x, y = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (12,))
    beta = (torch.rand(12, 4) < 0.9).double()
    meta = (torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))
    return model, advisor, x, y, beta, meta


def _grad(model, advisor, x, y, beta, meta, step, names, **kw):
    return advisor_meta_gradient(model, advisor, dict(model.named_parameters()), dict(model.named_buffers()), x, y,
                                 beta, *meta, step, names, **kw)


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


class _Features(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m.forward_head(self.m.forward_features(x), pre_logits=True)


def meta_loss_at(model, advisor, theta, x, y, beta, meta, step):
    """L_meta(theta) directly: masked MES virtual step of every parameter, plain CE of the meta batch."""
    ap, i = {}, 0
    for k, p in advisor.named_parameters():
        ap[k] = theta[i:i + p.numel()].view_as(p)
        i += p.numel()
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    f = functional_call(_Features(model), ({f"m.{k}": v for k, v in params.items()},
                                           {f"m.{k}": v for k, v in bufs.items()}), (x,))
    fc = {"weight": params["fc.weight"], "bias": params["fc.bias"]}
    plain = F.cross_entropy(functional_call(model.fc, fc, (f,)), y, reduction="none").detach()
    mask, s = functional_call(advisor, ap, (f.detach(), plain))
    loss = mes_ce(functional_call(model.fc, fc, (mask * f,)), y, beta * s).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    fast = {k: step.apply(p.detach(), g, None) for (k, p), g in zip(params.items(), grads)}
    logits = functional_call(model, (fast, {k: b.clone() for k, b in model.named_buffers()}), (meta[0],))
    return F.cross_entropy(logits, meta[1]).item()


@pytest.mark.parametrize("step", [VirtualStep(0.5), VirtualStep(0.3, momentum=0.9, weight_decay=1e-3, nesterov=True)])
@pytest.mark.parametrize("derivatives", ["forward", "reverse"])
def test_meta_gradient_equals_finite_differences(setup, step, derivatives):
    model, advisor, x, y, beta, meta = setup
    result = _grad(model, advisor, x, y, beta, meta, step, virtual_names(model, "exact"), derivatives=derivatives)
    g = flat(result.wnet_grads)
    theta = torch.cat([p.detach().flatten() for p in advisor.parameters()])
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):  # directional derivatives along random directions
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        fd = (meta_loss_at(model, advisor, theta + eps * v, x, y, beta, meta, step)
              - meta_loss_at(model, advisor, theta - eps * v, x, y, beta, meta, step)) / (2 * eps)
        torch.testing.assert_close((g * v).sum().item(), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("parts", [("mfrw", "mes"), ("mfrw",), ("mes",)])
def test_meta_gradient_equals_deep_copy_oracle(setup, parts):
    model, _, x, y, beta, meta = setup
    torch.manual_seed(3)
    advisor = AdvisorNet(16, 4, parts, embed=6).double()
    result = _grad(model, advisor, x, y, beta, meta, VirtualStep(0.4), virtual_names(model, "exact"))
    want = deepcopy_advisor_meta_gradient(model, advisor, x, y, beta, *meta, lr=0.4)
    for k, g in want.items():
        torch.testing.assert_close(result.wnet_grads[k], g, rtol=1e-9, atol=1e-12)


def test_skip_cuts_the_second_order_path_the_same_way_in_both_modes(setup):
    model, advisor, x, y, beta, meta = setup
    names = virtual_names(model, "skip", 1)
    assert len(names) < len(dict(model.named_parameters()))
    fwd = _grad(model, advisor, x, y, beta, meta, VirtualStep(0.5), names, derivatives="forward")
    rev = _grad(model, advisor, x, y, beta, meta, VirtualStep(0.5), names)  # auto: reverse for skip
    torch.testing.assert_close(flat(fwd.wnet_grads), flat(rev.wnet_grads), rtol=1e-9, atol=1e-12)
    exact = _grad(model, advisor, x, y, beta, meta, VirtualStep(0.5), virtual_names(model, "exact"))
    assert not torch.allclose(flat(exact.wnet_grads), flat(rev.wnet_grads))


def test_meta_step_leaves_model_and_buffers_untouched(setup):
    model, advisor, x, y, beta, meta = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _grad(model, advisor, x, y, beta, meta, VirtualStep(0.5), virtual_names(model, "exact"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mask_is_applied_in_the_virtual_pass_not_in_the_meta_pass(setup):
    """With a mask of zeros the virtual step sees no features, so only the classifier bias moves; the meta loss
    is the plain CE of the model at that w_hat (plain features), not the CE of the bias alone."""
    model, _, x, y, beta, meta = setup
    advisor = AdvisorNet(16, 4, ("mfrw",), embed=6).double()
    with torch.no_grad():
        advisor.mask_head.weight.zero_()
        advisor.mask_head.bias.fill_(-1e4)  # sigmoid -> exactly 0
    lr = 0.5
    result = _grad(model, advisor, x, y, beta, meta, VirtualStep(lr), virtual_names(model, "exact"))
    fc = model.get_classifier()
    bias_grad = torch.autograd.grad(F.cross_entropy(fc.bias.expand(12, 4), y), fc.bias)[0]
    fast = {k: p.detach() for k, p in model.named_parameters()}
    fast["fc.bias"] = fast["fc.bias"] - lr * bias_grad
    plain_meta = F.cross_entropy(functional_call(model, fast, (meta[0],)), meta[1]).item()
    masked_meta = F.cross_entropy(fast["fc.bias"].expand(6, 4), meta[1]).item()
    assert result.meta_loss == pytest.approx(plain_meta, rel=1e-10)
    assert abs(plain_meta - masked_meta) > 1e-3


# -- bad inputs ---------------------------------------------------------------------------------------------------
def test_a_backbone_without_the_split_is_a_one_line_error():
    with pytest.raises(UserError, match="forward_features/forward_head") as err:
        make_split(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--advisor"):
        parse_advisor("mfrw,attention")


@pytest.mark.parametrize(("args", "needle"), [
    (["--advisor", "mfrw,foo"], "--advisor: unknown name(s) 'foo'"),
    (["--advisor", "mfrw,,mes"], "--advisor 'mfrw,,mes': item 2 is empty"),
    (["--advisor", "mes,mes"], "--advisor names mes twice"),
    (["--advisor-rho", "1.5"], "--advisor-rho': 1.5 is not in the range"),
])
def test_bad_advisor_options_exit_2(tmp_path, capsys, args, needle):
    code, _, err = call_main(["metatrain", "--src", "digits-pmd", "--out", str(tmp_path / "o"), "--quiet",
                              "--method", "advisor", "--epochs", "1", *args], capsys)
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err


# -- the stage ----------------------------------------------------------------------------------------------------
def small_cfg(tmp_path, **kw):
    base = MetaTrainConfig(src="digits-pmd", out=str(tmp_path / "run"), method="advisor", epochs=3,
                           warmup_epochs=1, batch_size=64, meta_set="clean:5", meta_batch_size=50, meta_lr=1e-4,
                           meta_weight_decay=0.0, actual_step="updated", device="cpu", seed=0)
    return replace(base, **kw)


def test_cli_defaults_export_the_classifier_evaluated_without_the_mask(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = call_main(["metatrain", "--src", "digits-pmd", "--method", "advisor", "--out", str(out),
                                   "--epochs", "2", "--warmup-epochs", "1", "--quiet", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    run = json.loads((out / "run.json").read_text())
    assert (run["meta_lr"], run["actual_step"], run["advisor"]) == (1e-4, "updated", "mfrw,mes")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["meta_steps"] > 0 and 0 < rows[1]["mask_mean"] < 1 and 0 < rows[1]["mes_s_mean"] < 1
    info = json.loads((out / "classifier.json").read_text())
    assert info["advisor"] == ["mfrw", "mes"] and "advisor" in (out / "README.md").read_text()
    model = create_model(info["model"], info["num_classes"], in_chans=info["in_chans"])
    model.load_state_dict(load_file(str(out / "classifier.safetensors")))
    assert not (out / "model.safetensors").exists()  # not a weighting net
    trainer = launch(small_cfg(tmp_path / "x"))  # the same test split
    top1 = evaluate(model, trainer.stage.test_loader, torch.device("cpu"))["top1"]
    assert top1 == pytest.approx(result["final"]["test_top1"], abs=1e-6)  # evaluation: plain features


def test_resume_after_interrupted_epoch_is_exact(tmp_path):
    full = launch(small_cfg(tmp_path / "a"))
    full.run()
    cfg = small_cfg(tmp_path / "b")
    broken = launch(cfg)
    with crash_at(3, 4, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):  # in the middle of the last epoch
        broken.run()
    resumed = launch(cfg, resume=True)
    assert resumed.start_epoch == 2
    resumed.run()
    for (k, a), b in zip(full.stage.wnet.state_dict().items(), resumed.stage.wnet.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(full.stage.model.state_dict().items(), resumed.stage.model.state_dict().values()):
        assert torch.equal(a, b), k
    a = load_file(str(tmp_path / "a" / "run" / "classifier.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "classifier.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="nothing to resume"):
        launch(cfg, resume=True).run()


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_any_timm_backbone_through_its_split_equals_the_oracle(name):
    torch.manual_seed(0)
    model = create_model(name, 3, in_chans=1).double()
    split = make_split(model)
    x, y = torch.randn(6, 1, 32, 32, dtype=torch.float64), torch.randint(0, 3, (6,))
    meta = (torch.randn(4, 1, 32, 32, dtype=torch.float64), torch.randint(0, 3, (4,)))
    advisor = AdvisorNet(split.head.in_features, 3, embed=5).double()
    beta = (torch.rand(6, 3) < 0.9).double()
    result = _grad(model, advisor, x, y, beta, meta, VirtualStep(0.3), virtual_names(model, "exact"))
    want = deepcopy_advisor_meta_gradient(model, advisor, x, y, beta, *meta, lr=0.3)
    for k, g in want.items():
        torch.testing.assert_close(result.wnet_grads[k], g, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("meta_grad", ["skip:1", "famus"])
def test_stage_runs_the_cut_meta_gradients(tmp_path, meta_grad):
    trainer = launch(small_cfg(tmp_path, epochs=1, warmup_epochs=0, meta_grad=meta_grad))
    before = {k: v.clone() for k, v in trainer.stage.wnet.state_dict().items()}
    row = trainer.run()["final"]
    assert row["meta_steps"] > 0 and all(v == v for v in (row["meta_loss"], row["train_loss"]))
    assert any(not torch.equal(before[k], v) for k, v in trainer.stage.wnet.state_dict().items())

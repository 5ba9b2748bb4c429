"""``scripts/authors_code.py`` / ``bench_vs_reference.py --official-*``: loading the authors' files from a checkout.

The checkout here is a fake the test writes into ``tmp_path``: files with the authors' names, module-level
behaviour and function signatures (a top level that parses ``sys.argv``, builds datasets through
``load_corrupted_data``, calls ``.cuda()``; ``train(train_loader, train_meta_loader, model, vnet, optimizer_model,
optimizer_vnet, epoch)``; ``ACVNet(x, num, c)`` with ``torch.tensor([]).cuda()``), written for these tests. Nothing
of the real repositories is in this project.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import authors_code  # noqa: E402
import bench_vs_reference as bench  # noqa: E402

RESNET = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from cmw_transfer.models.builtin import CifarResNet


class ResNet32(CifarResNet):
    def __init__(self, num_classes):
        super().__init__(32, num_classes)
        self.linear = self._modules.pop("fc")

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1))

    def params(self):
        return self.parameters()


class VNet(nn.Module):
    def __init__(self, input, hidden1, output):
        super().__init__()
        self.linear1 = nn.Linear(input, hidden1)
        self.linear2 = nn.Linear(hidden1, output)

    def forward(self, x):
        return torch.sigmoid(self.linear2(F.relu(self.linear1(x))))

    def params(self):
        return self.parameters()
'''

MW_NET = '''
import argparse
import torch
import torch.nn.functional as F
from torch.func import functional_call
from resnet import ResNet32, VNet
from load_corrupted_data import CIFAR10, CIFAR100

parser = argparse.ArgumentParser()
parser.add_argument('--dataset', default='cifar10')
parser.add_argument('--batch_size', default=100, type=int)
parser.add_argument('--lr', default=0.1, type=float)
parser.add_argument('--momentum', default=0.9, type=float)
parser.add_argument('--weight-decay', default=5e-4, type=float)
args = parser.parse_args()
device = torch.device("cuda")
print(args)


def build_dataset():
    data = CIFAR10(root='../data', train=True, download=True)
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)


def build_model():
    model = ResNet32(args.dataset == 'cifar10' and 10 or 100)
    if torch.cuda.is_available():
        model.cuda()
    return model


def train(train_loader, train_meta_loader, model, vnet, optimizer_model, optimizer_vnet, epoch):
    print('\\nEpoch: %d' % epoch)
    meta_iter = iter(train_meta_loader)
    for inputs, targets in train_loader:
        model.train()
        inputs, targets = inputs.to(device), targets.to(device)
        meta_model = build_model().cuda()
        meta_model.load_state_dict(model.state_dict())
        cost = F.cross_entropy(meta_model(inputs), targets, reduction='none').reshape(-1, 1)
        l_f_meta = torch.sum(cost * vnet(cost.data)) / len(cost)
        names, leaves = zip(*meta_model.named_parameters())
        grads = torch.autograd.grad(l_f_meta, leaves, create_graph=True)
        virtual = {n: p - args.lr * g for n, p, g in zip(names, leaves, grads)}
        inputs_val, targets_val = next(meta_iter)
        l_g_meta = F.cross_entropy(functional_call(meta_model, virtual, (inputs_val.to(device),)),
                                   targets_val.to(device))
        optimizer_vnet.zero_grad()
        l_g_meta.backward()
        STEP_NET
        cost_w = F.cross_entropy(model(inputs), targets, reduction='none').reshape(-1, 1)
        with torch.no_grad():
            w_new = vnet(cost_w)
        loss = torch.sum(cost_w * w_new) / len(cost_w)
        optimizer_model.zero_grad()
        loss.backward()
        optimizer_model.step()


train_loader = build_dataset()
model = build_model()
vnet = VNet(1, 100, 1).cuda()
'''

ACVNET = '''
import torch
import torch.nn as nn


class ACVNet(nn.Module):
    def __init__(self, input, hidden1, hidden2, output, num_classes):
        super().__init__()
        self.feature = nn.Module()
        self.feature.layer = nn.Sequential(nn.Linear(input, hidden1), nn.ReLU(inplace=True))
        self.classfier = nn.Module()
        self.classfier.layers = nn.ModuleList(nn.Sequential(nn.Linear(hidden2, output), nn.Sigmoid())
                                              for _ in range(num_classes))

    def forward(self, x, num, c):
        num = torch.argmax(num, -1)
        h = self.feature.layer(x)
        output = torch.tensor([]).cuda()
        for i in range(h.shape[0]):
            output = torch.cat((output, self.classfier.layers[c[num[i]]](h[i].unsqueeze(0))), 0)
        return output

    def params(self):
        return self.parameters()
'''


def write_checkouts(root: Path, step_net: str = "optimizer_vnet.step()") -> tuple[Path, Path]:
    mwn, cmwn = root / "meta-weight-net", root / "CMW-Net"
    mwn.mkdir()
    (mwn / "resnet.py").write_text(textwrap.dedent(RESNET))
    (mwn / "MW-Net.py").write_text(textwrap.dedent(MW_NET).replace("STEP_NET", step_net))
    acv = cmwn / authors_code.CMWN_FILE
    acv.parent.mkdir(parents=True)
    acv.write_text(textwrap.dedent(ACVNET))
    return mwn, cmwn


def small_args(mwn: Path | None, cmwn: Path | None = None, *extra: str):
    argv = ["--batch-size", "4", "--meta-batch-size", "4", "--size", "8", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--no-memory", *extra]
    for flag, value in (("--official-mwn", mwn), ("--official-cmwn", cmwn)):
        argv += [flag, str(value)] if value else []
    return argv


@pytest.mark.parametrize("with_acvnet", [False, True], ids=["mwnet-vnet", "cmwnet-acvnet"])
def test_the_loaded_step_equals_the_toolkit_and_leaves_no_trace(tmp_path, with_acvnet):
    mwn, cmwn = write_checkouts(tmp_path)
    cuda, tensor_cuda, argv = nn.Module.cuda, torch.Tensor.cuda, list(sys.argv)
    check = bench.check_against_authors(bench.parse_args(small_args(mwn, cmwn if with_acvnet else None)))
    assert bench.agree(check, rtol=1e-12), check
    assert check["net_grad_max_abs"] > 1e-3 and check["classifier_max_abs"] > 1e-3  # not zero == zero
    # the patches are undone and the checkout's flat modules do not shadow anything
    assert nn.Module.cuda is cuda and torch.Tensor.cuda is tensor_cuda and sys.argv == argv
    assert "resnet" not in sys.modules and "load_corrupted_data" not in sys.modules
    assert str(mwn) not in sys.path


def test_the_check_tells_a_different_step_apart(tmp_path):
    """A train() that skips the net's update re-weights with the old net: the check must see it."""
    mwn, cmwn = write_checkouts(tmp_path, step_net="pass")
    check = bench.check_against_authors(bench.parse_args(small_args(mwn, cmwn)))
    assert check["classifier_max_abs_diff"] > 1e-9
    assert not bench.agree(check)


def test_the_authors_step_runs_the_module_globals_it_reads(tmp_path):
    mwn, cmwn = write_checkouts(tmp_path)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 2, 9])
    step = authors_code.AuthorsStep(mwn, "cpu", x, y, x, y, cmwn_dir=cmwn, family=[2, 2, 1, 1, 1, 0, 0, 0, 0, 0])
    assert step.module.model is step.model and step.module.device == torch.device("cpu")
    assert step.module.train_loader.dataset.__class__.__name__ == "_NoData"  # their data module never ran
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    step()
    changed = [k for k, v in step.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "linear.weight" in changed and any("running_mean" in k for k in changed)
    assert len(step.vnet.net.classfier.layers) == 3


def test_bench_labels_its_baseline_in_every_table(tmp_path, capsys):
    mwn, cmwn = write_checkouts(tmp_path)
    bench.main(small_args(mwn, cmwn, "--also-stand-in"))
    out = capsys.readouterr().out
    assert "authors' code vs the toolkit" in out
    tables = [line for line in out.splitlines() if line.startswith("| mode |")]
    assert len(tables) >= 2  # wall-clock and CPU time; a third for quiet rounds when the machine had any
    label = "baseline (authors): authors' code: MW-Net.py train() unchanged, CMW-Net's ACVNet"
    assert out.count(label) == len(tables)  # one label per table, however many the machine's load produced
    rows = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")}
    assert {"authors", "stand-in", "exact", "floor", "floor-exact", "erm"} <= rows
    bench.main(small_args(None))
    out = capsys.readouterr().out
    tables = sum(line.startswith("| mode |") for line in out.splitlines())
    assert out.count("baseline (stand-in): stand-in: tests/reference_official.py") == tables >= 2
    assert "| authors |" not in out


def test_a_checkout_without_the_files_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(small_args(tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "MW-Net.py not found" in err[0]
    with pytest.raises(SystemExit) as exc:
        bench.main(["--official-cmwn", str(tmp_path)])
    assert exc.value.code == 2

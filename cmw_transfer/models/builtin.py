"""Small built-in classifiers that timm does not ship: CIFAR ResNets, a CNN for the embedded digits and a LeNet-style
CNN for 28x28 grey images (the MNIST family).

The CIFAR ResNets follow He et al. (2016) §4.2: by default shortcut **option A** (identity, with a stride-2
subsample and zero-padded extra channels where the shape changes: no parameters), which is the ResNet-32 of the
MW-Net / CMW-Net papers and code (0.46M parameters); option B (a 1x1 conv + BN projection there) is kept as a
variant.

Both expose timm's ``group_matcher`` so that stage-wise tools (SLMO skip, FaMUS gating, layer groups) treat them
exactly like timm models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride``, zero-pad the new channels evenly on both sides (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_lo = (cout - cin) // 2
        self.pad_hi = cout - cin - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if (stride != 1 or cin != cout) and shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        elif stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PooledClassifier(nn.Module):
    """timm's head interface for the built-ins: ``forward_features`` -> global average pool -> ``fc``."""

    fc: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


class CifarResNet(PooledClassifier):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16/32/64 channels.

    ``shortcut="A"`` (the paper's, parameter-free) or ``"B"`` (1x1 conv + BN projection where the shape changes).
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CIFAR ResNet shortcut must be 'A' or 'B', got '{shortcut}'")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1, shortcut)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = 64
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^conv1|bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}


class SmallCNN(PooledClassifier):
    """Two conv blocks and a linear head: fast enough to meta-train on 8x8 digits in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.num_features = 2 * width
        self.fc = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^conv1|bn1", "blocks": r"^layer(\d+)"}


class LeNet(nn.Module):
    """LeNet's shape for 28x28 grey images: two 3x3 conv blocks (BN, ReLU, 2x2 max-pool) and a two-layer head.

    Sized for CPUs: an epoch of 60,000 Fashion-MNIST images at batch 128 costs about 25 s of one CPU thread,
    loader included (``scripts/bench_real.py``); 3x3 rather than LeNet's 5x5 kernels, which train 2.5x slower.
    timm's interface:
    ``forward_features`` is the ``2w x 7 x 7`` map (any other size is average-pooled to 7 x 7 in the head),
    ``forward_head(pre_logits=True)`` the ReLU'd ``hidden`` layer (``num_features``), ``get_classifier`` the last
    linear layer, and ``group_matcher`` gives stem / conv block / hidden layer / classifier for SLMO and FaMUS.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.fc1 = nn.Linear(2 * width * 49, hidden)
        self.num_features = hidden
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return F.max_pool2d(self.layer1(x), 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.shape[-2:] != (7, 7):
            x = F.adaptive_avg_pool2d(x, 7)
        x = F.relu(self.fc1(x.flatten(1)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^conv1|bn1", "blocks": [(r"^layer(\d+)", None), (r"^fc1", (2,))]}

"""OLTR (Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an Open World") on any timm backbone.

Pieces, following the official code (zhmiao/OpenLongTailRecognition-OLTR) where the paper is ambiguous:

* visual memory ``M``: class centroids ``[C, D]`` of the pooled features (a buffer, set by the trainer);
* reachability ``gamma = s / min_i ||v - c_i||`` (``s`` = ``reachability_scale``, 10 officially);
* dynamic meta-embedding ``v_meta = gamma * (v + tanh(W_sel v) * (softmax(W_hal v) @ M))``. The paper prints the
  factor as ``1/gamma`` but says it should shrink open-set samples; the official code multiplies by ``gamma``,
  which does (far from every centroid -> small gamma -> small embedding -> low confidence), and so do we;
* cosine-norm classifier: ``s_cos * (|x| / (1 + |x|)) * x/|x| . w/|w|`` (the official squashing);
* modulated attention: non-local self-attention on the feature map times a learned spatial softmax, added back
  to the map (``x + spatial * attention(x)``), for channel-first 4-D feature maps (CNNs);
* discriminative centroid loss: pull ``|v - c_y|^2 / 2`` (batch mean), push ``max(0, m - mean_ij |v_i - c_j|^2)``
  over the other centroids (own-class entries zeroed, divided by ``B*C`` as the official code), weight 0.01.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cmw_transfer.errors import UserError

COSINE_SCALE = 16.0
REACHABILITY_SCALE = 10.0
DCL_MARGIN = 10.0
DCL_PUSH_WEIGHT = 0.01


def squared_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` squared Euclidean distances without the ``[B, C, D]`` intermediate (ImageNet: 1000 x 2048)."""
    d2 = (features.pow(2).sum(1, keepdim=True) + centroids.pow(2).sum(1)[None, :]
          - 2.0 * features @ centroids.t())
    return d2.clamp_min(0.0)


def reachability(features: torch.Tensor, centroids: torch.Tensor, scale: float = REACHABILITY_SCALE) -> torch.Tensor:
    """``scale / distance to the nearest centroid``: high near a known class, low for open-set samples."""
    nearest = squared_distances(features, centroids).min(1).values.clamp_min(1e-12).sqrt()
    return scale / nearest


def discriminative_centroid_loss(features: torch.Tensor, targets: torch.Tensor, centroids: torch.Tensor,
                                 margin: float = DCL_MARGIN, push_weight: float = DCL_PUSH_WEIGHT) -> torch.Tensor:
    """Pull each feature to its class centroid, push it away from the others until ``margin`` (squared distance).

    ``attract = sum_i |v_i - c_{y_i}|^2 / 2 / B``; ``repel = max(0, margin - sum_{i, j != y_i} |v_i - c_j|^2 / (B C))``;
    returns ``attract + push_weight * repel``. The centroids get no gradient here (the trainer sets them).
    """
    b, c = features.shape[0], centroids.shape[0]
    attract = (features - centroids[targets]).pow(2).sum() / 2.0 / b
    d2 = squared_distances(features, centroids)
    others = torch.ones_like(d2).scatter_(1, targets[:, None], 0.0)
    repel = (margin - (d2 * others).sum() / (b * c)).clamp_min(0.0)
    return attract + push_weight * repel


class CosineNormClassifier(nn.Module):
    """Normalised class weights against a norm-squashed feature: bounded logits whatever the feature norm."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = COSINE_SCALE) -> None:
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=1, keepdim=True)
        squashed = (norm / (1.0 + norm)) * (x / norm.clamp_min(1e-12))
        return self.scale * squashed @ F.normalize(self.weight, dim=1).t()


class ModulatedAttention(nn.Module):
    """OLTR's modulated attention: embedded-Gaussian self-attention masked by a spatial softmax, residual.

    The spatial attention reads the whole map through one linear layer, so the map size is fixed at
    construction (7x7 for a 224 ResNet). The mask conv starts at zero: the layer starts as the identity.
    """

    def __init__(self, channels: int, height: int, width: int, reduction: int = 2) -> None:
        super().__init__()
        inter = max(1, channels // reduction)
        self.inter, self.size = inter, (height, width)
        self.g = nn.Conv2d(channels, inter, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.conv_mask = nn.Conv2d(inter, channels, 1, bias=False)
        self.fc_spatial = nn.Linear(height * width * channels, height * width)
        for conv in (self.g, self.theta, self.phi):
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_mask.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if (h, w) != self.size:
            raise UserError(f"modulated attention was built for {self.size[0]}x{self.size[1]} feature maps, got "
                            f"{h}x{w}: keep the input size fixed or use --no-modulated-attention")
        g = self.g(x).flatten(2).transpose(1, 2)
        theta = self.theta(x).flatten(2).transpose(1, 2)
        phi = self.phi(x).flatten(2)
        attended = torch.softmax(theta @ phi, dim=-1) @ g  # [B, HW, inter]
        mask = self.conv_mask(attended.transpose(1, 2).reshape(b, self.inter, h, w))
        spatial = torch.softmax(self.fc_spatial(x.flatten(1)), dim=1).view(b, 1, h, w)
        return x + spatial * mask


class MetaEmbeddingHead(nn.Module):
    """Dynamic meta-embedding + cosine classifier over a visual memory of class centroids."""

    def __init__(self, feat_dim: int, num_classes: int, *, cosine_scale: float = COSINE_SCALE,
                 reachability_scale: float = REACHABILITY_SCALE) -> None:
        super().__init__()
        self.reachability_scale = float(reachability_scale)
        self.hallucinator = nn.Linear(feat_dim, num_classes)
        self.selector = nn.Linear(feat_dim, feat_dim)
        self.classifier = CosineNormClassifier(feat_dim, num_classes, cosine_scale)
        self.register_buffer("centroids", torch.zeros(num_classes, feat_dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: squared distances of wide features overflow float16, and the head is tiny
        with torch.autocast(v.device.type, enabled=False):
            v, memory = v.float(), self.centroids.float()
            gamma = reachability(v, memory, self.reachability_scale)
            v_memory = torch.softmax(self.hallucinator(v), dim=1) @ memory
            selector = torch.tanh(self.selector(v))
            return self.classifier(gamma[:, None] * (v + selector * v_memory))


def feature_map_and_pooled(backbone: nn.Module, x: torch.Tensor,
                           attention: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's split: ``forward_features`` (map), optional attention on it, ``forward_head(pre_logits=True)``."""
    fmap = backbone.forward_features(x)
    if attention is not None:
        fmap = attention(fmap)
    return fmap, backbone.forward_head(fmap, pre_logits=True)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and logits in one backbone pass, for a plain timm classifier or an :class:`OLTRModel`."""
    if isinstance(model, OLTRModel):
        return model.features_and_logits(x)
    fmap = model.forward_features(x)
    return model.forward_head(fmap, pre_logits=True), model.forward_head(fmap)


def check_backbone(model: nn.Module, name: str) -> None:
    """A clear error for a backbone without timm's feature/head split (features must be reachable pre-logits)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise UserError(f"--model {name} has no forward_features/forward_head split; OLTR and the open-set "
                        "evaluation need one (any timm model or small_cnn / cifar_resnet32)")


class OLTRModel(nn.Module):
    """Stage 1: the backbone with its own (plain linear) classifier. Stage 2: meta-embedding head.

    ``forward(x)`` returns the logits of the current stage; ``forward(x, targets)`` in stage 2 also returns the
    discriminative centroid loss, so that everything with a gradient runs inside one (DDP) forward.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, attention: nn.Module | None = None,
                 cosine_scale: float = COSINE_SCALE, reachability_scale: float = REACHABILITY_SCALE,
                 dcl_margin: float = DCL_MARGIN, dcl_push_weight: float = DCL_PUSH_WEIGHT) -> None:
        super().__init__()
        self.backbone = backbone
        self.attention = attention
        feat_dim = int(backbone.num_features)
        self.head = MetaEmbeddingHead(feat_dim, num_classes, cosine_scale=cosine_scale,
                                      reachability_scale=reachability_scale)
        self.dcl_margin, self.dcl_push_weight = float(dcl_margin), float(dcl_push_weight)
        self.stage = 1

    @property
    def centroids(self) -> torch.Tensor:
        return self.head.centroids

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.head.centroids.copy_(centroids.to(self.head.centroids))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The direct feature ``v`` of the current stage (stage 2 with attention on the map)."""
        return feature_map_and_pooled(self.backbone, x, self.attention if self.stage == 2 else None)[1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stage == 1:
            fmap = self.backbone.forward_features(x)
            return self.backbone.forward_head(fmap, pre_logits=True), self.backbone.forward_head(fmap)
        v = self.pooled(x)
        return v, self.head(v)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        if self.stage == 1:
            return self.backbone(x)
        v = self.pooled(x)
        logits = self.head(v)
        if targets is None:
            return logits
        dcl = discriminative_centroid_loss(v.float(), targets, self.head.centroids, self.dcl_margin,
                                           self.dcl_push_weight)
        return logits, dcl

"""AffinityNet: a frozen ResNet with a trainable edge branch whose edges define pixel affinities (docs/method.md §11.4; loss §2.3).

The backbone is torchvision's ResNet with every BatchNorm frozen (running statistics, eps 1e-5) and
layer4 at stride 1 without dilation (output stride 16). Its five stage outputs are detached, so only the
edge branch ``fc_edge1..6`` trains. The branch predicts edge logits at stride 4; affinities are
``1 - max(sigmoid(logits) on the path)`` between pixel pairs of a ``PathIndex``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from core.checkpoint import load_imagenet_weights
from core.param_groups import ParameterGroup
from core.path_index import PathIndex, edge_to_affinity

BACKBONE_CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
}
EDGE_UPSAMPLING = (1, 1, 2, 4, 4)  # stage stride / 4, with layer4 at stride 1
EDGE_CHANNELS = 32
EDGE_GROUPS = 4
EDGE_MAP_MIN_SIZE = 512  # the original pads every inference image to 512x512
EDGE_MAP_MULTIPLE = 16  # output stride of the backbone
AFFINITY_LOSS_EPS = 1e-5


def _edge_layer(in_channels: int, upsampling: int) -> nn.Sequential:
    """1x1 conv (no bias) -> GroupNorm(4, 32) -> [bilinear upsampling, align_corners=True] -> ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, EDGE_CHANNELS, kernel_size=1, bias=False),
        nn.GroupNorm(EDGE_GROUPS, EDGE_CHANNELS),
    ]
    if upsampling > 1:
        layers.append(nn.Upsample(scale_factor=upsampling, mode="bilinear", align_corners=True))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class AffinityNet(nn.Module):
    """Edge logits ``(B, 1, ceil(H/4), ceil(W/4))`` from ``(B, 3, H, W)`` ImageNet-normalised images.

    Args:
        backbone: ``resnet50`` (the paper), ``resnet34`` or ``resnet18``.
        pretrained: ``none`` (random init), ``imagenet`` (torchvision's IMAGENET1K_V1, downloaded) or the
            path of a local torchvision-layout ``.pth`` / ``.safetensors`` (``fc.*`` is ignored).
        path_index: the pairs ``affinity`` scores (the original trains with ``PathIndex(10, (128, 128))``).
            Its index arrays become non-persistent buffers: they follow ``.to(device)`` but stay out of
            checkpoints, which can thus be loaded whatever the path index.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: str = "none",
        path_index: PathIndex | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"AffinityNet: backbone must be one of {sorted(BACKBONE_CHANNELS)}, got {backbone!r}")
        net = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
        del net.fc
        if pretrained != "none":
            load_imagenet_weights(net, backbone, str(pretrained))

        # layer4 at stride 1 without dilation: the stride sits on conv2 (Bottleneck) or conv1 (BasicBlock).
        first_block = net.layer4[0]
        strided_conv = first_block.conv2 if isinstance(first_block, Bottleneck) else first_block.conv1
        strided_conv.stride = (1, 1)
        first_block.downsample[0].stride = (1, 1)

        self.stage1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stage2 = net.layer1
        self.stage3 = net.layer2
        self.stage4 = net.layer3
        self.stage5 = net.layer4
        for stage in self.stages:
            stage.requires_grad_(False)

        channels = BACKBONE_CHANNELS[backbone]
        self.fc_edge1 = _edge_layer(channels[0], EDGE_UPSAMPLING[0])
        self.fc_edge2 = _edge_layer(channels[1], EDGE_UPSAMPLING[1])
        self.fc_edge3 = _edge_layer(channels[2], EDGE_UPSAMPLING[2])
        self.fc_edge4 = _edge_layer(channels[3], EDGE_UPSAMPLING[3])
        self.fc_edge5 = _edge_layer(channels[4], EDGE_UPSAMPLING[4])
        self.fc_edge6 = nn.Conv2d(len(channels) * EDGE_CHANNELS, 1, kernel_size=1, bias=True)

        self.path_index_size = path_index.size if path_index is not None else None
        self.num_path_groups = len(path_index.path_indices) if path_index is not None else 0
        for group, indices in enumerate(path_index.path_indices if path_index is not None else ()):
            self.register_buffer(f"path_indices_{group}", indices, persistent=False)

    @property
    def stages(self) -> tuple[nn.Module, ...]:
        return (self.stage1, self.stage2, self.stage3, self.stage4, self.stage5)

    @property
    def edge_layers(self) -> tuple[nn.Module, ...]:
        return (self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4, self.fc_edge5, self.fc_edge6)

    def parameter_groups(self) -> list[ParameterGroup]:
        """One group, the edge branch (the backbone is frozen): lr and weight decay as given, as the
        original's PolyOptimizer over ``trainable_parameters``."""
        return [ParameterGroup("edge", [parameter for layer in self.edge_layers for parameter in layer.parameters()])]

    def train(self, mode: bool = True) -> AffinityNet:
        """Train the edge branch; the backbone always stays in eval mode."""
        super().train(mode)
        for stage in self.stages:
            stage.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> edge logits ``(B, 1, ceil(H/4), ceil(W/4))``."""
        features = []
        x = images
        for stage in self.stages:
            x = stage(x).detach()
            features.append(x)
        edges = [layer(feature) for layer, feature in zip(self.edge_layers, features)]
        height, width = edges[1].shape[-2:]
        edges = [edge[..., :height, :width] for edge in edges]
        return self.fc_edge6(torch.cat(edges, dim=1))

    def affinity(self, edge_logits: Tensor) -> Tensor:
        """``(B, 1, h, w)`` edge logits -> ``(B, n_dirs, n_src)`` affinities on this model's path index."""
        if self.path_index_size is None:
            raise RuntimeError("AffinityNet.affinity needs a model built with a path_index")
        if tuple(edge_logits.shape[-2:]) != self.path_index_size:
            raise ValueError(
                f"AffinityNet.affinity: edge map {tuple(edge_logits.shape[-2:])} does not match the path "
                f"index size {self.path_index_size}"
            )
        path_indices = [getattr(self, f"path_indices_{group}") for group in range(self.num_path_groups)]
        edge = torch.sigmoid(edge_logits).reshape(edge_logits.shape[0], -1)
        return edge_to_affinity(edge, path_indices)

    @torch.no_grad()
    def edge_map(self, image: Tensor, min_size: int = EDGE_MAP_MIN_SIZE) -> Tensor:
        """Edge probabilities ``(ceil(H/4), ceil(W/4))`` of one normalised ``(3, H, W)`` image, flip-averaged.

        The image and its horizontal flip run as one batch, zero-padded right and bottom to
        ``max(min_size, H or W rounded up to 16)`` (the original pads to 512, and fails above it).
        The two logit maps are cropped, the flipped one is flipped back, and the sigmoid is taken of
        their mean.
        """
        _, height, width = image.shape
        padded_height = max(min_size, math.ceil(height / EDGE_MAP_MULTIPLE) * EDGE_MAP_MULTIPLE)
        padded_width = max(min_size, math.ceil(width / EDGE_MAP_MULTIPLE) * EDGE_MAP_MULTIPLE)
        batch = torch.stack([image, image.flip(-1)])
        batch = F.pad(batch, (0, padded_width - width, 0, padded_height - height))
        logits = self(batch)[:, 0, : math.ceil(height / 4), : math.ceil(width / 4)]
        return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)


def affinity_loss(aff: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
    """AffinityNet's loss on ``(B, n_dirs, n_src)`` affinities and their three target masks.

    Positive pairs pay ``-ln(aff + 1e-5)``, negative pairs ``-ln(1 + 1e-5 - aff)``; each of the bg / fg /
    neg terms is averaged over its pairs of the whole batch, and
    ``loss = ((bg_loss + fg_loss) / 2 + neg_loss) / 2``.
    """
    aff = aff.float()
    positive_cost = -torch.log(aff + AFFINITY_LOSS_EPS)
    negative_cost = -torch.log(1.0 + AFFINITY_LOSS_EPS - aff)
    bg_loss = (bg_pos * positive_cost).sum() / (bg_pos.sum() + AFFINITY_LOSS_EPS)
    fg_loss = (fg_pos * positive_cost).sum() / (fg_pos.sum() + AFFINITY_LOSS_EPS)
    neg_loss = (neg * negative_cost).sum() / (neg.sum() + AFFINITY_LOSS_EPS)
    loss = ((bg_loss + fg_loss) / 2 + neg_loss) / 2
    return {"loss": loss, "bg_loss": bg_loss, "fg_loss": fg_loss, "neg_loss": neg_loss}

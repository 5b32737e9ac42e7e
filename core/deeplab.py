"""DeepLab segmentation models for the final stage: a dilated torchvision ResNet and three heads.

- ``deeplabv2``: ASPP of four parallel 3x3 convs (bias, dilations 6/12/18/24) whose outputs are
  summed, weights N(0, 0.01); ResNet at output stride 8. The setup most WSSS papers tabulate.
- ``deeplabv1``: LargeFOV head, 3x3 conv dilation 12 -> 1x1 -> 1x1 classes with dropout 0.5;
  output stride 8.
- ``deeplabv3plus``: ASPP (1x1, 3x3 rates 6/12/18, image pooling) and a decoder on the stride-4
  features, GroupNorm(4) in head and decoder; backbone output stride 16 (the original's in-repo
  model).

Every model returns logits ``(B, K, h, w)`` at stride 8 (V1, V2) or 4 (V3+); callers resize them
(training to the crop, inference to the image). The backbone's BatchNorm is frozen by default
(running statistics and affine parameters fixed, as the recipes do with ImageNet weights);
``bn="train"`` keeps ordinary BatchNorm, which a randomly initialised backbone needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import ResNet
from torchvision.ops import FrozenBatchNorm2d

from core.checkpoint import load_imagenet_weights
from core.param_groups import ParameterGroup, original_groups

ARCHITECTURES = ("deeplabv2", "deeplabv1", "deeplabv3plus")
BN_MODES = ("frozen", "train")
BACKBONE_STRIDE = {"deeplabv2": 8, "deeplabv1": 8, "deeplabv3plus": 16}
BASIC_BLOCK_RESNETS = ("resnet18", "resnet34")

V2_DILATIONS = (6, 12, 18, 24)
V2_INIT_STD = 0.01
V1_DILATION = 12
V1_CHANNELS = 1024
V1_DROPOUT = 0.5
V3PLUS_RATES = (6, 12, 18)
V3PLUS_CHANNELS = 256
V3PLUS_LOW_LEVEL_CHANNELS = 48
V3PLUS_GROUPS = 4
V3PLUS_DROPOUTS = (0.5, 0.5, 0.1)  # after the ASPP projection, after decoder convs 1 and 2


# ----------------------------------------------------------------------------- backbone
def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Replace a BasicBlock layer's stride 2 by ``dilation`` (torchvision supports it only for
    Bottleneck): the first conv keeps the incoming dilation, every later 3x3 conv gets the new one."""
    previous = dilation // 2
    for index, block in enumerate(layer):
        for position, conv in enumerate((block.conv1, block.conv2)):
            rate = previous if index == 0 and position == 0 else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilated_resnet(name: str, output_stride: int, bn: str = "frozen") -> ResNet:
    """A torchvision ResNet (``fc`` removed) whose last stages trade stride for dilation.

    Output stride 8 dilates layer3 (2) and layer4 (4), 16 dilates layer4 (2): torchvision's
    ``replace_stride_with_dilation`` for Bottleneck ResNets, the same rule by hand for BasicBlock ones.
    """
    if not name.startswith("resnet") or not hasattr(torchvision.models, name):
        raise ValueError(f"--backbone must name a torchvision ResNet (resnet18 ... resnet152), got {name!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if output_stride not in (8, 16):
        raise ValueError(f"output stride must be 8 or 16, got {output_stride}")
    norm_layer = FrozenBatchNorm2d if bn == "frozen" else nn.BatchNorm2d
    builder = getattr(torchvision.models, name)
    if name in BASIC_BLOCK_RESNETS:
        net = builder(weights=None, norm_layer=norm_layer)
        if output_stride == 8:
            _dilate_basic_layer(net.layer3, 2)
            _dilate_basic_layer(net.layer4, 4)
        else:
            _dilate_basic_layer(net.layer4, 2)
    else:
        net = builder(weights=None, norm_layer=norm_layer,
                      replace_stride_with_dilation=[False, output_stride == 8, True])
    del net.fc
    return net


class ResNetFeatures(nn.Module):
    """``(B, 3, H, W)`` -> (stride-4 features of layer1, last features of layer4)."""

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_level_channels = _out_channels(net.layer1)
        self.out_channels = _out_channels(net.layer4)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        low_level = self.layer1(self.stem(images))
        return low_level, self.layer4(self.layer3(self.layer2(low_level)))


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


# ----------------------------------------------------------------------------- heads
class DeepLabV2Head(nn.Module):
    """Sum of four 3x3 convs (with bias) at dilations 6, 12, 18, 24: ``(B, C, h, w)`` -> ``(B, K, h, w)``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True) for rate in V2_DILATIONS
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=V2_INIT_STD)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Tensor, low_level: Tensor | None = None) -> Tensor:
        return torch.stack([branch(features) for branch in self.branches]).sum(0)


class DeepLabV1Head(nn.Module):
    """LargeFOV: 3x3 conv (dilation 12) -> ReLU -> dropout -> 1x1 -> ReLU -> dropout -> 1x1 classes."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, V1_CHANNELS, 3, padding=V1_DILATION, dilation=V1_DILATION),
            nn.ReLU(inplace=True), nn.Dropout2d(V1_DROPOUT),
            nn.Conv2d(V1_CHANNELS, V1_CHANNELS, 1), nn.ReLU(inplace=True), nn.Dropout2d(V1_DROPOUT),
            nn.Conv2d(V1_CHANNELS, num_classes, 1),
        )
        for conv in self.layers:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.layers[-1].weight, mean=0.0, std=V2_INIT_STD)

    def forward(self, features: Tensor, low_level: Tensor | None = None) -> Tensor:
        return self.layers(features)


def _conv_gn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.GroupNorm(V3PLUS_GROUPS, out_channels), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLabV3's pyramid: 1x1 and three dilated 3x3 branches plus image pooling, projected to ``channels``."""

    def __init__(self, in_channels: int, channels: int = V3PLUS_CHANNELS) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_gn_relu(in_channels, channels, 1)]
                                      + [_conv_gn_relu(in_channels, channels, 3, rate) for rate in V3PLUS_RATES])
        self.pool = _conv_gn_relu(in_channels, channels, 1)
        self.project = nn.Sequential(_conv_gn_relu(channels * (len(V3PLUS_RATES) + 2), channels, 1),
                                     nn.Dropout(V3PLUS_DROPOUTS[0]))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the last features, upsampled and fused with the stride-4 features, then classified."""

    def __init__(self, in_channels: int, low_level_channels: int, num_classes: int,
                 channels: int = V3PLUS_CHANNELS) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.reduce = _conv_gn_relu(low_level_channels, V3PLUS_LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            _conv_gn_relu(channels + V3PLUS_LOW_LEVEL_CHANNELS, channels, 3), nn.Dropout(V3PLUS_DROPOUTS[1]),
            _conv_gn_relu(channels, channels, 3), nn.Dropout(V3PLUS_DROPOUTS[2]),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, features: Tensor, low_level: Tensor | None = None) -> Tensor:
        if low_level is None:
            raise ValueError("DeepLabV3PlusHead needs the stride-4 features")
        x = F.interpolate(self.aspp(features), size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([x, self.reduce(low_level)], dim=1)))


# ----------------------------------------------------------------------------- model
class DeepLab(nn.Module):
    """``(B, 3, H, W)`` ImageNet-normalised images -> logits ``(B, K, ceil(H/s), ceil(W/s))``, s = 8 or 4 (V3+).

    Parameter names: ``backbone.*`` (pretrained groups of the optimiser) and ``head.*`` (new layers,
    10x / 20x lr).

    Args:
        num_classes: K, background included.
        architecture: ``deeplabv2`` (the paper-table default), ``deeplabv1`` or ``deeplabv3plus``.
        backbone: any torchvision ResNet name (``resnet101`` for the recipes; resnet18/34 for tests).
        pretrained: ``none``, ``imagenet`` or a local weights file (see ``core.checkpoint.load_imagenet_weights``).
        bn: ``frozen`` backbone BatchNorm (the recipes) or ``train``.
        head_channels: width of the V3+ pyramid and decoder (256 in DeepLabV3+; smaller is cheaper on a CPU).
    """

    def __init__(self, num_classes: int, architecture: str = "deeplabv2", backbone: str = "resnet101",
                 pretrained: str = "none", bn: str = "frozen", head_channels: int = V3PLUS_CHANNELS) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"--architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if head_channels != V3PLUS_CHANNELS and architecture != "deeplabv3plus":
            raise ValueError(f"head_channels applies to deeplabv3plus only, not {architecture}")
        self.architecture = architecture
        net = dilated_resnet(backbone, BACKBONE_STRIDE[architecture], bn)
        if pretrained != "none":
            load_imagenet_weights(net, backbone, pretrained)
        self.backbone = ResNetFeatures(net)
        channels = self.backbone.out_channels
        if architecture == "deeplabv2":
            self.head: nn.Module = DeepLabV2Head(channels, num_classes)
        elif architecture == "deeplabv1":
            self.head = DeepLabV1Head(channels, num_classes)
        else:
            self.head = DeepLabV3PlusHead(channels, self.backbone.low_level_channels, num_classes, head_channels)

    def parameter_groups(self) -> list[ParameterGroup]:
        """The original's four groups: the ResNet is pretrained, the head is new (10x / 20x lr)."""
        return original_groups(self, pretrained=("backbone.",))

    def forward(self, images: Tensor) -> Tensor:
        low_level, features = self.backbone(images)
        return self.head(features, low_level)


"""Multi-scale, flip-averaged class activation maps in the original's artifact layout.

For each scale the photo is resized (bicubic) so both sides are multiples of the patch size
(``tools.transforms.cam_inputs``, run by DataLoader workers ahead of the model), the image and its
horizontal flip run as one batch, and the per-class activations ``(2, K, h, w)``
(background channel 0 included) are resized to the stride-4 size and to the full size and summed
over scales and flips. Only the present classes are kept, each divided by its maximum.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.conventions import strided_size

NORMALISE_EPSILON = 1e-5
FLIP_BATCH = 2  # the photo and its horizontal flip run as one batch
FLOAT_BYTES = 4  # attention probabilities are float32
ABSOLUTE_SCALE = 20  # a scale above this is an absolute square size (the original's rule)
# The CRA blocks' attention probabilities of one input may take at most this much memory. The paper's model
# (DeiT-B: 12 heads, patch 16, 21 class tokens, 4 CRA blocks) needs 3.2 GiB for a 500x375 VOC photo at scale
# 2.0, 5.7 GiB for VOC's largest (500x500) and 8.5 GiB for a 640x480 COCO photo; the limit leaves room for the
# block being computed and the model on a 40 GB GPU.
ATTENTION_LIMIT_BYTES = 16 * 2**30


def strided_up_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to a multiple of ``multiple``."""
    return ((height - 1) // multiple + 1) * multiple, ((width - 1) // multiple + 1) * multiple


def scaled_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """The original's per-scale input size: ``ceil(round(side * s) / multiple) * multiple``.

    A scale above 20 is an absolute square size, as in the original. A side that a small scale would
    round to 0 px (a 1-pixel-high photo at scale 0.5) keeps one patch.
    """
    if scale > ABSOLUTE_SCALE:
        return int(scale), int(scale)
    return (math.ceil(max(round(height * scale), 1) / multiple) * multiple,
            math.ceil(max(round(width * scale), 1) / multiple) * multiple)


def attention_tokens(input_size: tuple[int, int], patch_size: int, prefix_tokens: int) -> int:
    """Tokens of one ``(H, W)`` input: the class tokens plus the patch grid (sides rounded up to the patch
    size, as the backbone pads)."""
    return prefix_tokens + math.ceil(input_size[0] / patch_size) * math.ceil(input_size[1] / patch_size)


def cra_attention_bytes(input_size: tuple[int, int], patch_size: int, prefix_tokens: int, heads: int,
                        blocks: int) -> int:
    """Memory of the attention probabilities CAM inference keeps for one ``(H, W)`` input:
    ``2 (photo and flip) x blocks x heads x tokens^2 x 4 bytes``."""
    return FLIP_BATCH * blocks * heads * attention_tokens(input_size, patch_size, prefix_tokens) ** 2 * FLOAT_BYTES


def max_attention_tokens(heads: int, blocks: int) -> int:
    """The most tokens an input may have for ``cra_attention_bytes`` to stay within ``ATTENTION_LIMIT_BYTES``."""
    return math.isqrt(ATTENTION_LIMIT_BYTES // (FLIP_BATCH * blocks * heads * FLOAT_BYTES))


def cam_activations(segmentor: nn.Module, batch: torch.Tensor, with_cra: bool,
                    cra_layers: int) -> torch.Tensor:
    """Class maps ``(B, K, h, w)`` of a batch ``(B, 3, H, W)``: ReLU of the segmentation logits, weighted by
    the class-relevant attention of the last ``cra_layers`` blocks (docs/method.md §3)."""
    if not with_cra:
        return F.relu(segmentor(batch))
    seg_logits, cra = segmentor(batch, return_cra=True, cra_layers=cra_layers)
    return F.relu(seg_logits) * cra


@torch.no_grad()
def multiscale_cams(
    activations: Callable[[Tensor], Tensor],
    inputs: Sequence[Tensor],
    image_size: tuple[int, int],
    keys: np.ndarray,
    patch_size: int,
    exact_hr_cam: bool = False,
) -> dict[str, np.ndarray]:
    """``keys``, ``cam (n, ceil(H/4), ceil(W/4))`` and ``hr_cam (n, H, W)`` of one photo of ``image_size``.

    ``inputs`` are the normalised photo at each scale, ``(3, h_s, w_s)`` on the model's device (sides
    multiples of the patch size, see ``scaled_size``). ``activations`` maps a batch ``(2, 3, h_s, w_s)``
    (the photo and its flip) to non-negative class maps ``(2, K, h, w)`` (SemFormer: ReLU(seg logits)
    weighted by the class-relevant attention). ``keys`` are the present classes' ids (background 0
    first). By default the full-resolution map is resized to the size rounded up to a multiple of the
    model's ``patch_size`` and then cropped, as the original does with its patch 16 (a quirk that drops
    up to ``patch_size - 1`` px of content); ``exact_hr_cam`` resizes straight to ``(H, W)``.
    """
    height, width = image_size
    small = strided_size(height, width)
    large = (height, width) if exact_hr_cam else strided_up_size(height, width, patch_size)
    cam = hr_cam = 0.0  # sums of the resized maps over scales and flips
    for scaled in inputs:
        batch = torch.stack([scaled, scaled.flip(-1)])
        maps = F.relu(activations(batch).float()[:, 1:])
        maps = (maps[0] + maps[1].flip(-1)).unsqueeze(0)
        cam = cam + F.interpolate(maps, small, mode="bilinear", align_corners=False)[0]
        hr_cam = hr_cam + F.interpolate(maps, large, mode="bilinear", align_corners=False)[0]
    hr_cam = hr_cam[:, :height, :width]
    present = torch.as_tensor(np.asarray(keys[1:]) - 1, device=inputs[0].device, dtype=torch.long)
    cam, hr_cam = cam[present], hr_cam[present]
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + NORMALISE_EPSILON)
    hr_cam = hr_cam / (hr_cam.amax(dim=(1, 2), keepdim=True) + NORMALISE_EPSILON)
    return {"keys": np.asarray(keys, dtype=np.int64), "cam": cam.cpu().numpy().astype(np.float32),
            "hr_cam": hr_cam.cpu().numpy().astype(np.float32)}

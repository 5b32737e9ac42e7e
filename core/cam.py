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


def strided_up_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """``(H, W)`` rounded up to a multiple of ``multiple``."""
    return ((height - 1) // multiple + 1) * multiple, ((width - 1) // multiple + 1) * multiple


def scaled_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """The original's per-scale input size: ``ceil(round(side * s) / multiple) * multiple``.

    A scale above 20 is an absolute square size, as in the original.
    """
    if scale > 20:
        return int(scale), int(scale)
    return (math.ceil(round(height * scale) / multiple) * multiple,
            math.ceil(round(width * scale) / multiple) * multiple)


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

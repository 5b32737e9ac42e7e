"""Multi-scale, flipped inference of a segmentation model: class probabilities at the image size."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FUSIONS = ("mean_logits", "max_prob")
DEEPLAB_TEST_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@torch.no_grad()
def multiscale_probabilities(
    model: Callable[[Tensor], Tensor], image: Tensor, scales: tuple[float, ...] = DEEPLAB_TEST_SCALES,
    flip: bool = True, fusion: str = "mean_logits",
) -> Tensor:
    """Class probabilities ``(K, H, W)`` float32 of one normalised image ``(3, H, W)``.

    For each scale the image is resized (bilinear) to ``round(H * s) x round(W * s)``, run with its
    horizontal flip as one batch when ``flip``, and each logit map ``(K, h, w)`` is resized back to
    ``(H, W)`` (bilinear) and unflipped. ``mean_logits`` averages the logits of all scales and flips
    and takes the softmax (the original sums them: same argmax); ``max_prob`` takes each class's
    maximum softmax probability over them and renormalises over the classes.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {FUSIONS}, got {fusion!r}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"--scales must be positive, got {scales}")
    height, width = image.shape[-2:]
    fused: Tensor | None = None
    count = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch = image[None]
        if size != (height, width):
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        if flip:
            batch = torch.cat([batch, batch.flip(-1)])
        logits = F.interpolate(model(batch).float(), size=(height, width), mode="bilinear", align_corners=False)
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        if fusion == "mean_logits":
            total = logits.sum(0)
            fused = total if fused is None else fused + total
        else:
            best = logits.softmax(dim=1).amax(0)
            fused = best if fused is None else torch.maximum(fused, best)
        count += len(logits)
    if fusion == "mean_logits":
        return (fused / count).softmax(dim=0)
    return fused / fused.sum(dim=0, keepdim=True)

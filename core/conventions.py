"""Conventions every stage shares (no torch): the stride of the CAM and affinity grid, and the label
value that means "no class" (ignored by losses and scores, uncertain in affinity labels)."""
from __future__ import annotations

CAM_STRIDE = 4
IGNORE_INDEX = 255


def strided_size(height: int, width: int, stride: int = CAM_STRIDE) -> tuple[int, int]:
    """``(ceil(H / stride), ceil(W / stride))``: the grid of an ``H x W`` photo at ``stride``."""
    return (height - 1) // stride + 1, (width - 1) // stride + 1

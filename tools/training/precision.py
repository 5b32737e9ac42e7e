"""Mixed precision: what ``--amp`` means on a device, shared by training and inference."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device`` (None = full precision; ``auto`` = bf16 on CUDA where
    supported, else fp16, and full precision on the CPU)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32, as torch 1.7 (the original's) did by
    default: ``--amp off`` then reproduces the original's precision, not a stricter fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """``torch.autocast`` for ``--amp`` on ``device``, or nothing for full precision."""
    dtype = resolve_amp(amp, device)
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)

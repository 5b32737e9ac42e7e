"""Adapter of timm's ``VisionTransformer`` (learned absolute positions): DeiT, DeiT-III, ViT (AugReg
ImageNet-21k), CLIP, DINO and DINOv2 with or without registers (docs/method.md §11.1)."""
from __future__ import annotations

from functools import partial

from timm.models import vision_transformer

from core.backbones.base import Backbone


class ViTBackbone(Backbone):
    """A timm ``VisionTransformer`` (``VisionTransformerDistilled`` included): positions are the learned
    grid alone, so its blocks need nothing but the tokens."""

    # timm's converter of released ViT files (OpenAI CLIP, original DINOv2, DeiT-III's gamma_ keys).
    checkpoint_filter = staticmethod(partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True))

    def prepare_blocks(self, grid: tuple[int, int], num_prefix: int) -> dict:
        """No keyword arguments: a ViT block is ``block(x)``."""
        return {}

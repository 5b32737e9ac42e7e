"""``create_backbone``: the timm model of a name, its weights, and the adapter of its family."""
from __future__ import annotations

from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from core.backbones.base import Backbone
from core.backbones.eva import EvaBackbone
from core.backbones.vit import ViTBackbone
from core.backbones.weights import (DYNAMIC_SIZE_FLAG, IMAGENET_ALIAS, PRETRAINED_NONE, PRETRAINED_TIMM,
                                    create_timm_model, load_weight_file)

SEMFORMER_BACKBONE = "deit_small_patch16_224"
CAAE_BACKBONE = "deit_base_distilled_patch16_224"
# timm model class -> adapter, and the families each covers (named in the error for anything else).
ADAPTERS = ((VisionTransformer, ViTBackbone), (Eva, EvaBackbone))
SUPPORTED_FAMILIES = ("VisionTransformer (DeiT, DeiT-III, ViT, CLIP, DINO, DINOv2 with or without registers)",
                      "Eva (EVA-02)")


def unsupported(model_name: str, kind: str) -> str:
    """The one-line refusal of a timm model outside ``SUPPORTED_FAMILIES``."""
    return f"{model_name}: a timm {kind} that is not a supported backbone; supported families: {'; '.join(SUPPORTED_FAMILIES)}"


def create_backbone(
    model_name: str = SEMFORMER_BACKBONE,
    image_size: int = 224,
    pretrained: str = PRETRAINED_NONE,
    grad_checkpointing: bool = False,
    **timm_overrides,
) -> Backbone:
    """The backbone of the timm model ``model_name`` (see ``core.backbones.base.Backbone``).

    Args:
        model_name: a timm name, with or without its weights' tag (paper: ``deit_small_patch16_224``
            for SemFormer, ``deit_base_distilled_patch16_224`` for the CAAE).
        image_size: training image size, a multiple of the patch size (448 = 32 x 14 for patch 14).
        pretrained: ``timm`` (the tag's own weights), ``imagenet`` (alias of ``timm`` for ImageNet
            weights), ``none`` or a local weight file; see ``core.backbones.weights``.
        grad_checkpointing: recompute block activations in backward to save memory.
        **timm_overrides: passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim``,
            ``num_heads``, ``patch_size`` for small test models).
    """
    try:
        model = create_timm_model(model_name, pretrained, timm_overrides)
    except TypeError as error:  # a timm family without the dynamic-size flag (ResNet, ...)
        if DYNAMIC_SIZE_FLAG not in str(error):
            raise
        raise ValueError(unsupported(model_name, "model")) from error
    adapter = next((adapter for family, adapter in ADAPTERS if isinstance(model, family)), None)
    if adapter is None:
        raise ValueError(unsupported(model_name, type(model).__name__))
    if pretrained not in (PRETRAINED_TIMM, IMAGENET_ALIAS, PRETRAINED_NONE):
        load_weight_file(model, pretrained, adapter.checkpoint_filter)
    return adapter(model, image_size, grad_checkpointing)

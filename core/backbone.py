"""Vision-transformer backbone on timm's ViT / DeiT models (docs/method.md §11.1).

The timm model is kept as ``self.model``; only its patch embedding, blocks and final norm are used.
Its own prefix tokens, position embedding and classifier heads are read once at construction and
removed. The patch tokens get ``grid_posembed``, a learned grid of position embeddings resized
bicubically to the current patch grid, so any input size works (inputs are zero-padded right and
bottom to a multiple of the patch size).
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.checkpoint import load_strict, read_state_dict
from core.errors import CheckpointError

SEMFORMER_BACKBONE = "deit_small_patch16_224"
CAAE_BACKBONE = "deit_base_distilled_patch16_224"
REMOVED_PARAMETERS = ("cls_token", "reg_token", "dist_token", "pos_embed")
CLASSIFIER_PREFIXES = ("head.", "head_dist.")  # ignored in weight files: the heads are removed
POSEMBED_INTERPOLATION = "bicubic"
DEFAULT_ATTN_LAYERS = 4


def grid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of an image once it is padded to a multiple of ``patch_size``."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def pad_to_patch_multiple(images: Tensor, patch_size: int) -> Tensor:
    """Zero-pad ``(B, C, H, W)`` images on the right and bottom to multiples of ``patch_size``."""
    height, width = images.shape[-2:]
    pad_bottom = -height % patch_size
    pad_right = -width % patch_size
    if pad_bottom == 0 and pad_right == 0:
        return images
    return F.pad(images, (0, pad_right, 0, pad_bottom))


def resize_grid_posembed(posembed: Tensor, new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resize (align_corners=False, no antialias) of a square ``(1, G*G, D)`` grid to ``new_grid``."""
    side = int(math.sqrt(posembed.shape[1]))
    return resample_abs_pos_embed(
        posembed,
        new_size=list(new_grid),
        old_size=[side, side],
        num_prefix_tokens=0,
        interpolation=POSEMBED_INTERPOLATION,
        antialias=False,
    )


def attention_with_probabilities(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention`` computed explicitly from its own weights, also returning the probabilities.

    ``x (B, T, D)`` -> ``(output (B, T, D), softmax probabilities (B, heads, T, T))``; the
    probabilities are taken before attention dropout.
    """
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    query, key = attn.q_norm(query), attn.k_norm(key)
    probabilities = ((query * attn.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
    out = (attn.attn_drop(probabilities) @ value).transpose(1, 2).reshape(batch, num_tokens, -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), probabilities


def block_with_attention(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """One timm ``Block`` whose attention probabilities ``(B, heads, T, T)`` are returned too."""
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise TypeError(
            f"attention maps need timm Block/Attention modules, got {type(block).__name__}/"
            f"{type(getattr(block, 'attn', None)).__name__}"
        )
    attended, probabilities = attention_with_probabilities(block.attn, block.norm1(x))
    x = x + block.drop_path1(block.ls1(attended))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, probabilities


def _create_timm_model(model_name: str, download: bool, overrides: dict) -> nn.Module:
    """``timm.create_model``; a failed download of the ImageNet weights becomes one ``CheckpointError``
    line that names the offline alternatives."""
    try:
        return timm.create_model(model_name, pretrained=download, **overrides)
    except Exception as error:  # offline, proxy, damaged cache: requests, OSError, RuntimeError, ...
        if not download:
            raise
        first_line = str(error).strip().split("\n", 1)[0]
        raise CheckpointError(
            f"cannot fetch timm's {model_name} ImageNet weights ({type(error).__name__}: {first_line}); on an "
            "offline machine pass a local file with --pretrained PATH, or train from scratch with --pretrained none"
        ) from error


class ViTBackbone(nn.Module):
    """A timm ViT / DeiT returning normalised patch tokens, optionally behind extra leading tokens.

    Args:
        model_name: any timm ViT / DeiT with a learned absolute position embedding
            (paper: ``deit_small_patch16_224`` for SemFormer, ``deit_base_distilled_patch16_224`` for CAAE).
        image_size: training image size; the position-embedding grid is resized once to
            ``image_size // patch_size`` per side (448 -> 28 x 28 for SemFormer).
        pretrained: ``none`` (random init), ``imagenet`` (timm's weights, downloaded once to the
            Hugging Face / torch hub cache) or the path of a ``.pth`` (DeiT's ``{'model': ...}`` or a plain
            state dict) or ``.safetensors`` file in timm's layout, loaded strictly (classifier heads may
            be absent).
        grad_checkpointing: recompute block activations in backward to save memory.
        **timm_overrides: passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim``,
            ``num_heads``, ``patch_size`` for small test models).
    """

    def __init__(
        self,
        model_name: str = SEMFORMER_BACKBONE,
        image_size: int = 224,
        pretrained: str = "none",
        grad_checkpointing: bool = False,
        **timm_overrides,
    ) -> None:
        super().__init__()
        model = _create_timm_model(model_name, pretrained == "imagenet", timm_overrides)
        if not isinstance(model, VisionTransformer) or model.pos_embed is None:
            raise ValueError(
                f"{model_name}: a timm VisionTransformer with a learned absolute position embedding is needed"
            )
        model.reset_classifier(0)  # the ImageNet heads are never used
        if pretrained not in ("imagenet", "none"):
            if not Path(pretrained).is_file():
                raise CheckpointError(f"{pretrained}: --pretrained file not found (give imagenet, none or a "
                                      "local timm .pth / .safetensors)")
            state = read_state_dict(pretrained)
            state = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIXES)}
            load_strict(model, state, pretrained)

        patch_height, patch_width = model.patch_embed.patch_size
        if patch_height != patch_width:
            raise ValueError(f"{model_name}: square patches are needed, got {patch_height}x{patch_width}")
        if image_size % patch_width:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_width}")
        self.patch_size = patch_width
        self.embed_dim = model.embed_dim
        self.num_heads = model.blocks[0].attn.num_heads
        self.pos_embed_size = image_size // patch_width
        self.grad_checkpointing = grad_checkpointing

        pos_embed = model.pos_embed.detach()
        if model.no_embed_class:
            grid_pos, cls_pos = pos_embed, torch.zeros_like(pos_embed[:, :1])
        else:
            grid_pos, cls_pos = pos_embed[:, model.num_prefix_tokens:], pos_embed[:, :1]
        cls_token = model.cls_token.detach() if model.cls_token is not None else torch.zeros_like(cls_pos)
        # Initial values for a model's own class tokens (SemFormer); plain tensors, not module state.
        self.cls_token_init = cls_token.clone()
        self.cls_pos_init = cls_pos.clone()
        self.grid_posembed = nn.Parameter(
            resize_grid_posembed(grid_pos, (self.pos_embed_size, self.pos_embed_size)).clone()
        )
        for name in REMOVED_PARAMETERS:
            if getattr(model, name, None) is not None:
                setattr(model, name, None)
        self.model = model

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of a ``height x width`` input."""
        return grid_size(height, width, self.patch_size)

    def grid_position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """``grid_posembed`` resized to ``grid`` -> ``(1, h*w, D)`` (unchanged when the size matches)."""
        return resize_grid_posembed(self.grid_posembed, grid)

    def embed_patches(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> patch tokens ``(B, h*w, D)`` without positions, and the grid ``(h, w)``."""
        patch_embed = self.model.patch_embed
        features = patch_embed.proj(pad_to_patch_multiple(images, self.patch_size))
        grid = (features.shape[-2], features.shape[-1])
        return patch_embed.norm(features.flatten(2).transpose(1, 2)), grid

    def forward_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> normalised patch tokens ``(B, N, D)``; no prefix token takes part."""
        patches, grid = self.embed_patches(images)
        tokens, _ = self._run_blocks(patches + self.grid_position_embedding(grid), attn_layers=0)
        return tokens

    forward = forward_features

    def forward_with_tokens(
        self,
        images: Tensor,
        tokens: Tensor,
        token_pos: Tensor,
        return_attn: bool = False,
        attn_layers: int = DEFAULT_ATTN_LAYERS,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Run ``K`` extra leading tokens ``(1, K, D)`` (positions ``token_pos (1, K, D)``) with the patches.

        Returns ``(B, K+N, D)``; with ``return_attn`` also the softmax attention probabilities
        ``(B, heads, K+N, K+N)`` of the last ``attn_layers`` blocks, in block order.
        """
        patches, grid = self.embed_patches(images)
        batch = patches.shape[0]
        x = torch.cat([tokens.expand(batch, -1, -1), patches], dim=1)
        x = x + torch.cat([token_pos, self.grid_position_embedding(grid)], dim=1)
        if not return_attn:
            return self._run_blocks(x, attn_layers=0)[0]
        if not 1 <= attn_layers <= self.depth:
            raise ValueError(f"attn_layers must be in [1, {self.depth}], got {attn_layers}")
        return self._run_blocks(x, attn_layers=attn_layers)

    def _run_blocks(self, x: Tensor, attn_layers: int) -> tuple[Tensor, list[Tensor]]:
        """Blocks then final norm; the last ``attn_layers`` blocks also return attention probabilities."""
        x = self.model.norm_pre(self.model.pos_drop(x))
        first_with_attention = self.depth - attn_layers
        probabilities = []
        for index, block in enumerate(self.model.blocks):
            if index >= first_with_attention:
                x, block_probabilities = block_with_attention(block, x)
                probabilities.append(block_probabilities)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.model.norm(x), probabilities

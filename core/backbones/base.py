"""The backbone interface that SemFormer, the CAAE and CAM inference use, and what every timm family shares (docs/method.md §11.1).

A backbone wraps one timm model, kept as ``self.model``; only its patch embedding, ``norm_pre``, blocks
and final norm run. At construction the model's own class token, distillation token and position
embedding are read and removed (its classifier heads are removed when it is created):

- the position embedding of the patch grid becomes ``grid_posembed``, resized once (bicubic) to the
  training grid ``image_size // patch_size`` per side, and resized again to each input's grid;
- the class token and its position are the initial values of a model's own leading tokens
  (SemFormer's ``K`` class tokens, ``cls_token_init`` and ``cls_pos_init``, both ``(1, 1, D)``);
- register tokens (``model.reg_token``, DINOv2 with registers) are kept and take part in every block as
  in the pretrained model; a position embedding of theirs (timm's ``no_embed_class=False``) is added to
  them once here, as timm adds it before the first block. They are left out of the returned tokens and
  attention maps, so the class-relevant attention and the patch grid never see them.

The tokens inside the blocks are ``[K leading tokens, R registers, N = h*w patches]``. Inputs are
zero-padded right and bottom to a multiple of the patch size, so any input size works.

Attention maps are timm's own: the blocks whose maps are read run timm's unfused attention path
(``fused_attn = False`` for that call only) and a forward pre-hook on their ``attn_drop`` takes the
softmax probabilities, the module timm's ``AttentionExtract`` reads by default. Every other block keeps
fused attention (``scaled_dot_product_attention``).
"""
from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

POSEMBED_INTERPOLATION = "bicubic"
DEFAULT_ATTN_LAYERS = 4
REMOVED_PARAMETERS = ("cls_token", "dist_token", "pos_embed")


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


@contextmanager
def capture_attention(blocks: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """While open, ``blocks`` run timm's unfused attention and their softmax probabilities
    ``(B, heads, T, T)`` (before attention dropout) are appended to the yielded list, in call order.

    timm's ``Attention`` and ``EvaAttention`` compute ``softmax(q k^T * scale)`` and pass it to
    ``attn_drop`` when ``fused_attn`` is off; a forward pre-hook on ``attn_drop`` receives it. The
    flags and hooks are restored on exit, so the other blocks, and these ones afterwards, keep fused
    attention.
    """
    probabilities: list[Tensor] = []
    saved = [block.attn.fused_attn for block in blocks]
    handles = [
        block.attn.attn_drop.register_forward_pre_hook(lambda module, args: probabilities.append(args[0]))
        for block in blocks
    ]
    try:
        for block in blocks:
            block.attn.fused_attn = False
        yield probabilities
    finally:
        for block, fused in zip(blocks, saved):
            block.attn.fused_attn = fused
        for handle in handles:
            handle.remove()


def block_with_attention(block: nn.Module, x: Tensor, **block_kwargs) -> tuple[Tensor, Tensor]:
    """One timm block on ``x (B, T, D)``, also returning its attention probabilities ``(B, heads, T, T)``."""
    with capture_attention([block]) as probabilities:
        x = block(x, **block_kwargs)
    return x, probabilities[0]


class Backbone(nn.Module, metaclass=ABCMeta):
    """A timm vision transformer returning normalised patch tokens, optionally behind leading tokens.

    Subclasses adapt one timm family: ``prepare_blocks`` gives the keyword arguments every block of
    one input needs (rotary embeddings for EVA), ``checkpoint_filter`` is the family's timm function
    that converts a released weight file to timm's layout. Everything else is shared.

    Args:
        model: the timm model, already holding its weights and without classifier heads.
        image_size: training image size, a multiple of the patch size; the position grid is resized
            once to ``image_size // patch_size`` per side (448 -> 28 x 28 for SemFormer on DeiT-S).
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    checkpoint_filter: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]

    def __init__(self, model: nn.Module, image_size: int, grad_checkpointing: bool = False) -> None:
        super().__init__()
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        patch_height, patch_width = model.patch_embed.patch_size
        if patch_height != patch_width:
            raise ValueError(f"{name}: square patches are needed, got {patch_height}x{patch_width}")
        if image_size % patch_width:
            raise ValueError(f"image_size {image_size} is not a multiple of {name}'s patch size {patch_width}")
        if model.pos_embed is None:
            raise ValueError(f"{name}: a learned absolute position embedding is needed")
        for block in model.blocks:  # what ``capture_attention`` reads
            attn = block.attn
            if not (isinstance(getattr(attn, "fused_attn", None), bool) and isinstance(getattr(attn, "attn_drop", None), nn.Dropout)):
                raise ValueError(f"{name}: attention maps need timm attention modules with a fused_attn flag "
                                 f"and an attn_drop Dropout, got {type(attn).__name__}")
        self.patch_size = patch_width
        self.embed_dim = model.embed_dim
        self.num_heads = model.blocks[0].attn.num_heads
        self.pos_embed_size = image_size // patch_width
        self.grad_checkpointing = grad_checkpointing
        self.num_registers = 0 if model.reg_token is None else model.reg_token.shape[1]

        pos_embed = model.pos_embed.detach()
        num_prefix = model.num_prefix_tokens
        if model.no_embed_class:
            grid_pos, prefix_pos = pos_embed, None
        else:
            grid_pos, prefix_pos = pos_embed[:, num_prefix:], pos_embed[:, :num_prefix]
        has_cls = model.cls_token is not None
        cls_pos = prefix_pos[:, :1] if prefix_pos is not None and has_cls else torch.zeros_like(pos_embed[:, :1])
        cls_token = model.cls_token.detach() if has_cls else torch.zeros_like(cls_pos)
        # Initial values for a model's own class tokens (SemFormer); plain tensors, not module state.
        self.cls_token_init = cls_token.clone()
        self.cls_pos_init = cls_pos.clone()
        self.grid_posembed = nn.Parameter(
            resize_grid_posembed(grid_pos, (self.pos_embed_size, self.pos_embed_size)).clone()
        )
        if prefix_pos is not None and self.num_registers:
            with torch.no_grad():  # registers come last among timm's prefix tokens
                model.reg_token.add_(prefix_pos[:, num_prefix - self.num_registers:])
        for parameter in REMOVED_PARAMETERS:
            if getattr(model, parameter, None) is not None:
                setattr(model, parameter, None)
        self.model = model

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.model.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of blocks whose attention is not read in backward (saves memory)."""
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

    @abstractmethod
    def prepare_blocks(self, grid: tuple[int, int], num_prefix: int) -> dict:
        """Keyword arguments of every block for an input of patch grid ``grid`` whose sequence starts
        with ``num_prefix`` non-patch tokens (leading tokens and registers)."""

    def forward_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> normalised patch tokens ``(B, N, D)``; only the registers join them."""
        patches, grid = self.embed_patches(images)
        positioned = patches + self.grid_position_embedding(grid)
        tokens, _ = self._run_blocks(positioned[:, :0], positioned, grid, attn_layers=0)
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
        ``(B, heads, K+N, K+N)`` of the last ``attn_layers`` blocks, in block order (registers, which
        take part in the softmax, are left out of the maps).
        """
        if return_attn and not 1 <= attn_layers <= self.depth:
            raise ValueError(f"attn_layers must be in [1, {self.depth}], got {attn_layers}")
        patches, grid = self.embed_patches(images)
        leading = tokens.expand(patches.shape[0], -1, -1) + token_pos
        out, attentions = self._run_blocks(leading, patches + self.grid_position_embedding(grid), grid,
                                           attn_layers=attn_layers if return_attn else 0)
        return (out, attentions) if return_attn else out

    def _run_blocks(self, leading: Tensor, patches: Tensor, grid: tuple[int, int],
                    attn_layers: int) -> tuple[Tensor, list[Tensor]]:
        """``[leading, registers, patches]`` through ``norm_pre``, the blocks and the final norm; the last
        ``attn_layers`` blocks also give their attention probabilities. Registers are dropped from both."""
        model = self.model
        batch, num_leading = leading.shape[:2]
        parts = [leading, patches]
        if self.num_registers:
            parts.insert(1, model.reg_token.expand(batch, -1, -1))
        x = model.norm_pre(model.pos_drop(torch.cat(parts, dim=1)))
        block_kwargs = self.prepare_blocks(grid, num_leading + self.num_registers)
        first_with_attention = self.depth - attn_layers
        with capture_attention(model.blocks[first_with_attention:] if attn_layers else []) as attentions:
            for index, block in enumerate(model.blocks):
                if index < first_with_attention and self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False, **block_kwargs)
                else:
                    x = block(x, **block_kwargs)
        x = model.fc_norm(model.norm(x))  # timm keeps one of the two (fc_norm for average-pooled models)
        if not self.num_registers:
            return x, attentions
        keep = torch.cat([torch.arange(num_leading), torch.arange(num_leading + self.num_registers, x.shape[1])])
        keep = keep.to(x.device)
        return x[:, keep], [attention[:, :, keep][..., keep] for attention in attentions]

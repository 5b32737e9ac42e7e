"""Adapter of timm's ``Eva`` (EVA-02: learned absolute positions plus rotary position embeddings, RoPE)."""
from __future__ import annotations

from timm.models import eva
from torch import nn

from core.backbones.base import Backbone


class EvaBackbone(Backbone):
    """A timm ``Eva`` whose blocks take the rotary embedding of each input's patch grid.

    The timm model is created with ``dynamic_img_size=True``, so that its ``rope`` builds the
    embedding of any grid (``rope.get_embed(shape=(h, w))``, timm's own dynamic-size path; EVA-02
    rescales the grid to its pretraining grid, ``ref_feat_shape``). timm's ``EvaAttention`` rotates
    only the tokens after its ``num_prefix_tokens``: the leading tokens (SemFormer's ``K`` class
    tokens) and registers of the current input are those prefix tokens.
    """

    checkpoint_filter = staticmethod(eva.checkpoint_filter_fn)

    def __init__(self, model: nn.Module, image_size: int, grad_checkpointing: bool = False) -> None:
        if model.rope_mixed:
            raise ValueError(f"{model.pretrained_cfg.get('architecture')}: depth-dependent ('mixed') RoPE is not "
                             "supported, only EVA-02's axial RoPE")
        super().__init__(model, image_size, grad_checkpointing)

    def prepare_blocks(self, grid: tuple[int, int], num_prefix: int) -> dict:
        """``{'rope': (h*w, 2*rope_dim)}`` for the grid (``None`` without RoPE), and ``num_prefix``
        unrotated prefix tokens in every block's attention."""
        for block in self.model.blocks:
            block.attn.num_prefix_tokens = num_prefix
        rope = self.model.rope
        return {"rope": None if rope is None else rope.get_embed(shape=list(grid))}

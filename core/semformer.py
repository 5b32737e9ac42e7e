"""SemFormer: a ViT segmentor with one token per class, trained through a frozen CAAE (docs/method.md §11.3, §2.2, §3; paper: arXiv:2210.14618).

``SemFormerSegmentor`` prepends ``K`` class tokens to the patch tokens. The class tokens give class
embeddings ``(B, K, C)`` compared with the CAAE's class representations; the patch tokens give
segmentation logits ``(B, K, h, w)``. ``SemFormer`` adds the frozen CAAE and computes, for every
present (image, class) pair, how the class-masked foreground and background images embed.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones.base import DEFAULT_ATTN_LAYERS
from core.backbones.build import SEMFORMER_BACKBONE, create_backbone
from core.caae import CAAE
from core.checkpoint import CheckpointError, load_strict
from core.losses import cosine_similarity, seen_pairs
from core.param_groups import ParameterGroup, original_groups

SEGMENTOR_PREFIX = "segmentor."
SEG_DROPOUT_MODES = ("token", "channel")
CRA_EPS = 1e-5


class SeparateLinear(nn.Module):
    """``groups`` independent linear maps, one per token: ``out[b, k] = x[b, k] @ weight[k] + bias[k]``.

    Weight ``(groups, in, out)``, bias ``(groups, out)``. The weight keeps the original's init:
    kaiming-uniform(a=sqrt 5) on the 3-D tensor, whose fan-in is ``in * out`` by torch's rule; the
    bias is uniform in ``+-1/sqrt(in)``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, groups, in)`` -> ``(B, groups, out)``."""
        return torch.einsum("bki,kio->bko", x, self.weight) + self.bias


class FeatureDropout(nn.Module):
    """Dropout of whole tokens or whole channels of ``(B, N, D)`` token features.

    ``'token'`` (default) reproduces the original's ``Dropout2d`` on a 3-D tensor, whose mask has
    shape ``(B, N, 1)``: whole patch tokens are zeroed. ``'channel'`` zeroes whole feature channels
    of an image (mask ``(B, 1, D)``), what ``Dropout2d`` does on feature maps.
    """

    def __init__(self, p: float, mode: str = "token") -> None:
        super().__init__()
        if mode not in SEG_DROPOUT_MODES:
            raise ValueError(f"seg_dropout must be one of {SEG_DROPOUT_MODES}, got {mode!r}")
        self.p = p
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "token":
            return F.dropout1d(x, self.p, self.training)
        return F.dropout1d(x.transpose(1, 2), self.p, self.training).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def class_relevant_attention(attentions: list[Tensor], num_tokens: int, grid: tuple[int, int]) -> Tensor:
    """Class-relevant attention maps (docs/method.md §3, step 3) -> ``(B, K, h, w)`` in ``[0, 1)``.

    ``attentions`` are softmax probabilities ``(B, heads, K+N, K+N)`` of some blocks. The rows of
    the ``K = num_tokens`` class tokens over the ``N = h*w`` patch columns are averaged over heads,
    summed over blocks, and min-max normalised per (image, class): ``(a - min) / (max - min + 1e-5)``.
    """
    relevance = sum(attention[:, :, :num_tokens, num_tokens:].mean(dim=1) for attention in attentions)
    low = relevance.amin(dim=-1, keepdim=True)
    high = relevance.amax(dim=-1, keepdim=True)
    relevance = (relevance - low) / (high - low + CRA_EPS)
    return relevance.reshape(relevance.shape[0], num_tokens, *grid)


class SemFormerSegmentor(nn.Module):
    """ViT with ``K`` learnable class tokens, a per-class embedding head and a linear segmentation head.

    Args:
        num_classes: ``K``, background included.
        backbone_name: timm model (paper: ``deit_small_patch16_224``; see ``core.backbones.build``).
        image_size: training image size, a multiple of the patch size; the patch position grid is
            resized to it once (448 -> 28 x 28 for patch 16, 32 x 32 for patch 14).
        class_dim: ``C``, width of each class embedding (must match the CAAE's).
        seg_dropout: ``'token'`` (the original's behaviour) or ``'channel'`` dropout before ``seg_head``.
        dropout: dropout probability before ``seg_head``.
        pretrained, grad_checkpointing: see ``create_backbone`` (``timm``, ``none`` or a file).
        backbone_kwargs: extra ``timm.create_model`` arguments (small test models).
    """

    def __init__(
        self,
        num_classes: int,
        backbone_name: str = SEMFORMER_BACKBONE,
        image_size: int = 448,
        class_dim: int = 256,
        seg_dropout: str = "token",
        dropout: float = 0.5,
        pretrained: str = "none",
        grad_checkpointing: bool = False,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = create_backbone(
            backbone_name, image_size, pretrained, grad_checkpointing, **(backbone_kwargs or {})
        )
        embed_dim = self.backbone.embed_dim
        self.cls_token = nn.Parameter(self.backbone.cls_token_init.repeat(1, num_classes, 1))
        self.cls_posembed = nn.Parameter(self.backbone.cls_pos_init.repeat(1, num_classes, 1))
        self.cls_head = SeparateLinear(embed_dim, class_dim, groups=num_classes)
        self.seg_head = nn.Sequential(FeatureDropout(dropout, seg_dropout), nn.Linear(embed_dim, num_classes))

    def parameter_groups(self) -> list[ParameterGroup]:
        """The original's four groups: the ViT backbone is pretrained; the class tokens, their position
        embeddings and both heads are new."""
        return original_groups(self, pretrained=("backbone.",))

    def forward(
        self, images: Tensor, return_cra: bool = False, cra_layers: int = DEFAULT_ATTN_LAYERS
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``images (B, 3, H, W)``, zero-padded to the patch size; ``(h, w)`` is the patch grid.

        Training: ``(class embeddings ReLU(cls_head(tokens)) (B, K, C), seg_logits (B, K, h, w))``.
        Evaluation: ``seg_logits``, or ``(seg_logits, cra (B, K, h, w))`` with ``return_cra``, the
        class-relevant attention of the last ``cra_layers`` blocks.
        """
        if return_cra and self.training:
            raise ValueError("return_cra is an inference option: call model.eval() first")
        num_classes = self.num_classes
        grid = self.backbone.grid_size(*images.shape[-2:])
        output = self.backbone.forward_with_tokens(
            images, self.cls_token, self.cls_posembed, return_attn=return_cra, attn_layers=cra_layers
        )
        tokens, attentions = output if return_cra else (output, None)
        seg_logits = self.seg_head(tokens[:, num_classes:]).transpose(1, 2)
        seg_logits = seg_logits.reshape(tokens.shape[0], num_classes, *grid)
        if self.training:
            return F.relu(self.cls_head(tokens[:, :num_classes])), seg_logits
        if return_cra:
            return seg_logits, class_relevant_attention(attentions, num_classes, grid)
        return seg_logits


def ae_inputs(images: Tensor, crop_boxes: Tensor, ae_size: int) -> tuple[Tensor, Tensor]:
    """The CAAE-size view of a training batch and its valid-pixel mask (docs/method.md §10.2, SemFormer's CAAE view).

    ``images (B, 3, S, S)`` are bilinearly resized (align_corners=True) to ``ae_size``;
    ``crop_boxes (B, 4)`` hold each crop's non-padded region ``[xmin, ymin, xmax, ymax]`` in input
    pixels, scaled by ``floor(box * ae_size / S)`` into ``grad_masks (B, 1, ae_size, ae_size)``.
    """
    height, width = images.shape[-2:]
    ae_images = F.interpolate(images, size=(ae_size, ae_size), mode="bilinear", align_corners=True)
    boxes = crop_boxes.long().to(images.device) * ae_size
    xmin, xmax = (boxes[:, [0, 2]] // width).unbind(1)
    ymin, ymax = (boxes[:, [1, 3]] // height).unbind(1)
    positions = torch.arange(ae_size, device=images.device)
    rows = (positions >= ymin[:, None]) & (positions < ymax[:, None])
    columns = (positions >= xmin[:, None]) & (positions < xmax[:, None])
    grad_masks = (rows[:, :, None] & columns[:, None, :]).unsqueeze(1).to(images.dtype)
    return ae_images, grad_masks


class SemFormer(nn.Module):
    """The trainable segmentor plus the frozen CAAE ``ae`` that scores its class masks.

    The AE's parameters never require gradients and it always runs in eval mode, but it is not
    under ``no_grad``: gradients flow through it back to the masks.
    """

    def __init__(self, segmentor: SemFormerSegmentor, ae: CAAE) -> None:
        super().__init__()
        if ae.num_classes != segmentor.num_classes:
            raise ValueError(f"CAAE has {ae.num_classes} classes, the segmentor {segmentor.num_classes}")
        self.segmentor = segmentor
        self.ae = ae.requires_grad_(False)
        self.ae.eval()

    def train(self, mode: bool = True) -> SemFormer:
        super().train(mode)
        self.ae.train(False)
        return self

    def forward(self, images: Tensor, ae_images: Tensor, labels: Tensor, grad_masks: Tensor) -> dict[str, Tensor]:
        """Same as ``forward_train`` (so that DistributedDataParallel can wrap the model)."""
        return self.forward_train(images, ae_images, labels, grad_masks)

    def forward_train(
        self, images: Tensor, ae_images: Tensor, labels: Tensor, grad_masks: Tensor
    ) -> dict[str, Tensor]:
        """One training forward (docs/method.md §2.2).

        ``images (B, 3, S, S)``, ``ae_images (B, 3, s, s)`` and ``grad_masks (B, 1, s, s)`` from
        ``ae_inputs``, ``labels (B, K)`` with background. Returns ``masks (B, K, s, s)``,
        ``seg_sim (B, K)`` and the 1-D similarity vectors over the present pairs' pulled / pushed
        classes: ``fg_pull`` and ``bg_pull`` (to maximise), ``fg_push`` and ``bg_push`` (to minimise).
        """
        if not self.segmentor.training:
            raise ValueError("forward_train needs training mode: call model.train() first")
        seg_cre, logits = self.segmentor(images)
        logits = F.interpolate(logits, size=ae_images.shape[-2:], mode="bilinear", align_corners=True)
        masks = torch.sigmoid(logits) * grad_masks

        pairs = seen_pairs(labels)
        pair_masks = masks[pairs.batch_index, pairs.class_index].unsqueeze(1)
        pair_images = ae_images[pairs.batch_index]
        foreground = pair_images * pair_masks
        background = pair_images * (1.0 - pair_masks)

        num_pairs = pair_images.shape[0]
        cre_fg, cre_bg = self.ae.get_cre(torch.cat([foreground, background])).split(num_pairs)
        crs_pairs = self.ae.get_crs(num_pairs)
        seg_sim = cosine_similarity(seg_cre, self.ae.get_crs(images.shape[0]))
        fg_sim = cosine_similarity(cre_fg, crs_pairs)
        bg_sim = cosine_similarity(cre_bg, crs_pairs)
        return {
            "masks": masks,
            "seg_sim": seg_sim,
            "fg_pull": fg_sim[pairs.pull],
            "fg_push": fg_sim[pairs.push],
            "bg_pull": bg_sim[pairs.push],
            "bg_push": bg_sim[pairs.pull],
        }

    def segmentor_state_dict(self) -> dict[str, Tensor]:
        """The weights to save: the segmentor's, keys ``segmentor.*`` (the CAAE is left out)."""
        return {SEGMENTOR_PREFIX + key: value for key, value in self.segmentor.state_dict().items()}


def load_segmentor_weights(
    segmentor: SemFormerSegmentor, state_dict: dict[str, Tensor], source: str | Path
) -> None:
    """Load a saved SemFormer state dict (keys ``segmentor.*``, see ``segmentor_state_dict``) strictly."""
    foreign = [key for key in state_dict if not key.startswith(SEGMENTOR_PREFIX)]
    if foreign:
        raise CheckpointError(
            f"{source}: not a SemFormer checkpoint, keys without the '{SEGMENTOR_PREFIX}' prefix: {foreign[:5]}"
        )
    weights = {key[len(SEGMENTOR_PREFIX):]: value for key, value in state_dict.items()}
    load_strict(segmentor, weights, source)

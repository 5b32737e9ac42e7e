"""CAAE, the class-aware autoencoder (docs/method.md §11.2; loss §2.1).

The encoder's patch tokens ``T (B, N, D)`` are lifted to per-class embeddings ``E = ReLU(T W)``
``(B, N, K*C)``. Summed over tokens they give the class embeddings (CRE) ``(B, K, C)``, compared by
cosine with learned class representations (CRS) ``(B, K, C)``; decoded back they reconstruct the
normalised image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from core.backbones.base import Backbone
from core.backbones.build import CAAE_BACKBONE, create_backbone
from core.losses import cosine_similarity
from core.param_groups import ParameterGroup, original_groups

REDUCTIONS = ("sum", "mean")
DECODER_MLP_RATIO = 4.0
IMAGE_CHANNELS = 3


class CAAEEncoder(nn.Module):
    """The backbone under the name ``vit_backbone`` (the original's key layout), returning patch tokens."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.vit_backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, N, D)``."""
        return self.vit_backbone.forward_features(images)


class CAAEDecoder(nn.Module):
    """ViT blocks without positional embedding, a LayerNorm and a per-patch pixel predictor."""

    def __init__(self, width: int, depth: int, num_heads: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.blocks = nn.Sequential(*[
            Block(width, num_heads, mlp_ratio=DECODER_MLP_RATIO, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, IMAGE_CHANNELS * patch_size * patch_size)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(B, h*w, width)`` -> image ``(B, 3, h*p, w*p)``; each patch vector is laid out (c, ky, kx)."""
        patches = self.mlp(self.norm(self.blocks(tokens)))
        output_size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        return F.fold(patches.transpose(1, 2), output_size, kernel_size=self.patch_size, stride=self.patch_size)


class CAAE(nn.Module):
    """Class-aware autoencoder over ``num_classes`` classes (background included).

    Args:
        num_classes: ``K``, background included.
        backbone_name: timm model of the encoder (paper: DeiT-B distilled, patch 16).
        image_size: training image size (224 in the paper: no position-embedding resize).
        class_dim: ``C``, width of each class embedding.
        decoder_width, decoder_depth, decoder_heads: the reconstruction decoder.
        reduction: ``'sum'`` (paper) or ``'mean'`` of the class embeddings over tokens.
        pretrained, grad_checkpointing: see ``create_backbone`` (``timm``, ``none`` or a file).
        backbone_kwargs: extra ``timm.create_model`` arguments (small test models).
    """

    def __init__(
        self,
        num_classes: int,
        backbone_name: str = CAAE_BACKBONE,
        image_size: int = 224,
        class_dim: int = 256,
        decoder_width: int = 768,
        decoder_depth: int = 8,
        decoder_heads: int = 12,
        reduction: str = "sum",
        pretrained: str = "none",
        grad_checkpointing: bool = False,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.num_classes = num_classes
        self.class_dim = class_dim
        self.reduction = reduction
        backbone = create_backbone(
            backbone_name, image_size, pretrained, grad_checkpointing, **(backbone_kwargs or {})
        )
        embed_dim = backbone.embed_dim
        self.encoder = CAAEEncoder(backbone)
        self.convert = nn.Sequential(nn.Linear(embed_dim, num_classes * class_dim, bias=False), nn.ReLU())
        self.re_convert = nn.Sequential(
            nn.Linear(num_classes * class_dim, embed_dim, bias=False), nn.LayerNorm(embed_dim)
        )
        self.crs = nn.Sequential(nn.Embedding(num_classes, class_dim), nn.ReLU())
        self.mlp = nn.Linear(embed_dim, decoder_width)
        self.decoder = CAAEDecoder(decoder_width, decoder_depth, decoder_heads, backbone.patch_size)

    def _class_embeddings(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Per-token embeddings ``E (B, N, K*C)``, their reduction ``CRE (B, K, C)`` and the patch grid."""
        grid = self.encoder.vit_backbone.grid_size(*images.shape[-2:])
        embeddings = self.convert(self.encoder(images))
        reduced = embeddings.sum(dim=1) if self.reduction == "sum" else embeddings.mean(dim=1)
        return embeddings, reduced.view(-1, self.num_classes, self.class_dim), grid

    def get_cre(self, images: Tensor) -> Tensor:
        """Class embeddings of ``(B, 3, H, W)`` images -> ``(B, K, C)``."""
        return self._class_embeddings(images)[1]

    def get_crs(self, batch_size: int) -> Tensor:
        """Learned class representations, the same for every image -> ``(batch_size, K, C)``."""
        class_ids = torch.arange(self.num_classes, device=self.crs[0].weight.device)
        return self.crs(class_ids).unsqueeze(0).expand(batch_size, -1, -1)

    def parameter_groups(self) -> list[ParameterGroup]:
        """The original's four groups: the ViT encoder is pretrained, the rest is new."""
        return original_groups(self, pretrained=("encoder.",))

    def reconstruct(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        """Decode per-token class embeddings ``(B, N, K*C)`` into an image ``(B, 3, h*p, w*p)``."""
        return self.decoder(self.mlp(self.re_convert(embeddings)), grid)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``images (B, 3, H, W)``, ``labels (B, K)`` -> ``(sim (B, K), recon (B, 3, H', W'))``.

        ``H', W'`` are ``H, W`` padded to the patch size. The CRS of absent classes is detached
        (``crs * y + crs.detach() * (1 - y)``): its value is unchanged, but only present classes'
        rows receive gradient.
        """
        batch = images.shape[0]
        if labels.shape != (batch, self.num_classes):
            raise ValueError(f"labels must have shape ({batch}, {self.num_classes}), got {tuple(labels.shape)}")
        embeddings, cre, grid = self._class_embeddings(images)
        crs = self.get_crs(batch)
        present = labels.to(crs.dtype).unsqueeze(-1)
        crs = crs * present + crs.detach() * (1.0 - present)
        return cosine_similarity(cre, crs), self.reconstruct(embeddings, grid)

"""CAM inputs too large for memory, refused before any model work: the attention matrices a ViT keeps for
the class-relevant attention grow with the square of the token count (``core.cam.cra_attention_bytes``)."""
from __future__ import annotations

from typing import Sequence

from core.cam import (ABSOLUTE_SCALE, ATTENTION_LIMIT_BYTES, attention_tokens, cra_attention_bytes,
                      max_attention_tokens, scaled_size)
from tools.cli.arguments import UsageError
from tools.data.descriptor import DatasetError
from tools.data.voc import VOCReader

GIB = 2**30
ADVICE = "resize the photo (VOC's have at most 500 px a side) or drop the large scales from --scales"


def check_cam_inputs(reader: VOCReader, ids: Sequence[str], scales: Sequence[float], patch_size: int,
                     prefix_tokens: int, heads: int, blocks: int) -> None:
    """Refuse an absolute scale (a usage error) or a photo at its largest relative scale (an error naming
    the id) whose input would need more than ``ATTENTION_LIMIT_BYTES`` of attention for ``blocks`` blocks of
    ``heads`` heads. Photo sizes come from the file headers (nothing is decoded): about 1.5 s for 10,582 ids."""
    def needed(size: tuple[int, int]) -> int:
        return cra_attention_bytes(size, patch_size, prefix_tokens, heads, blocks)

    def problem(size: tuple[int, int]) -> str:
        tokens = attention_tokens(size, patch_size, prefix_tokens)
        return (f"a {size[1]}x{size[0]} input of {tokens:,} tokens, whose attention in {blocks} "
                f"block(s) of {heads} heads would take {needed(size) / GIB:,.1f} GiB, above the limit of "
                f"{ATTENTION_LIMIT_BYTES / GIB:g} GiB (at most {max_attention_tokens(heads, blocks):,} tokens)")

    for scale in (scale for scale in scales if scale > ABSOLUTE_SCALE):
        size = scaled_size(1, 1, scale, patch_size)
        if needed(size) > ATTENTION_LIMIT_BYTES:
            raise UsageError(f"--scales {scale:g} is {problem(size)}; give smaller scales")
    relative = [scale for scale in scales if scale <= ABSOLUTE_SCALE]
    if not relative:
        return
    largest = max(relative)
    for image_id in ids:
        height, width = reader.image_size(image_id)
        size = scaled_size(height, width, largest, patch_size)
        if needed(size) > ATTENTION_LIMIT_BYTES:
            raise DatasetError(f"{reader.image_path(image_id)}: id '{image_id}' ({width}x{height}) at scale "
                               f"{largest:g} is {problem(size)}; {ADVICE}")

"""Import the original repository's SemFormer or CAAE checkpoint into this project's models.

The original keys are this project's keys (docs/method.md §11.5); the original also stored a few
tensors it never used (DeiT's own class token and position embedding in SemFormer, the distillation
token and head in CAAE), which are reported and dropped. Every other key must be present with the
shape the model expects. The model is built on the ``meta`` device (no weights, no download), only
to know its keys and shapes.

    python -m tools.import_original --kind semformer SemFormer@CAAE@DeiT-B-Dist.pth experiments/models/SemFormer.pth
    python -m tools.import_original --kind caae CAAE@DeiT-B-Dist.pth experiments/models/CAAE.pth
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from core.caae import CAAE
from core.checkpoint import CheckpointError, compare_state_dicts, read_state_dict
from core.semformer import SEGMENTOR_PREFIX, SemFormerSegmentor
from tools.artifacts.files import atomic_path
from tools.artifacts.model_card import describe_model, write_card
from tools.cli.arguments import StageArgumentParser
from tools.cli.exits import run_main
from tools.training.state import write_tensors

KINDS = ("semformer", "caae")
# Tensors the original saved but never used.
UNUSED_ORIGINAL_KEYS = {
    "semformer": ("segmentor.backbone.model.cls_token", "segmentor.backbone.model.pos_embed"),
    "caae": (
        "encoder.vit_backbone.model.dist_token",
        "encoder.vit_backbone.model.head_dist.weight",
        "encoder.vit_backbone.model.head_dist.bias",
    ),
}
# The tensor of shape (K, C) that gives the class count K and class embedding width C.
CLASS_SHAPE_KEYS = {"semformer": "segmentor.cls_head.bias", "caae": "crs.0.weight"}
DECODER_FLAGS = ("decoder_width", "decoder_depth", "decoder_heads")


@dataclass
class ImportReport:
    """What an import took and left: counts of imported tensors and values, and the keys dropped."""

    kind: str
    tensors: int
    values: int
    unused: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        lines = [f"imported {self.tensors} tensors ({self.values:,} values) into the {self.kind} model"]
        if self.unused:
            lines.append(f"dropped {len(self.unused)} tensors the original never used: {', '.join(self.unused)}")
        if self.unexpected:
            lines.append(f"dropped {len(self.unexpected)} unknown tensors: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def _class_shape(kind: str, state_dict: dict[str, Tensor]) -> dict[str, int]:
    """``num_classes`` and ``class_dim`` as stored in the checkpoint."""
    key = CLASS_SHAPE_KEYS[kind]
    if key not in state_dict or state_dict[key].dim() != 2:
        raise CheckpointError(f"not a {kind} checkpoint: it has no (K, C) tensor '{key}'")
    num_classes, class_dim = state_dict[key].shape
    return {"num_classes": num_classes, "class_dim": class_dim}


def expected_state_dict(kind: str, **model_kwargs) -> dict[str, Tensor]:
    """Our model's state dict, built on the meta device: keys and shapes only."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model_kwargs = {**model_kwargs, "pretrained": "none"}
    with torch.device("meta"):
        if kind == "semformer":
            segmentor = SemFormerSegmentor(**model_kwargs)
            return {SEGMENTOR_PREFIX + key: value for key, value in segmentor.state_dict().items()}
        return CAAE(**model_kwargs).state_dict()


def import_checkpoint(
    kind: str, state_dict: dict[str, Tensor], **model_kwargs
) -> tuple[dict[str, Tensor], ImportReport]:
    """Map an original checkpoint onto our ``kind`` model (``'semformer'`` or ``'caae'``).

    ``model_kwargs`` go to ``SemFormerSegmentor`` / ``CAAE`` (paper defaults otherwise);
    ``num_classes`` and ``class_dim`` default to the checkpoint's. Returns our state dict (SemFormer:
    keys ``segmentor.*``, as training saves it) and a report; raises ``CheckpointError`` naming every
    missing key and shape mismatch.
    """
    model_kwargs = {**_class_shape(kind, state_dict), **model_kwargs}
    expected = expected_state_dict(kind, **model_kwargs)
    diff = compare_state_dicts(expected, state_dict)
    if diff.missing or diff.mismatched:
        problems = diff.describe(include_unexpected=False)
        raise CheckpointError(f"the checkpoint does not fit the {kind} model\n{problems}")
    ours = {key: state_dict[key] for key in expected}
    unused = [key for key in diff.unexpected if key in UNUSED_ORIGINAL_KEYS[kind]]
    unexpected = [key for key in diff.unexpected if key not in UNUSED_ORIGINAL_KEYS[kind]]
    report = ImportReport(kind, len(ours), sum(tensor.numel() for tensor in ours.values()), unused, unexpected)
    return ours, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    parser.add_argument("--kind", choices=KINDS, required=True, help="which original checkpoint this is")
    parser.add_argument("input", type=Path, help="the original checkpoint (.pth)")
    parser.add_argument("output", type=Path, help="where to write this project's state dict (.pth)")
    parser.add_argument("--num_classes", type=int, default=None, help="K with background (default: the checkpoint's)")
    parser.add_argument("--class_dim", type=int, default=None, help="class embedding width (default: the checkpoint's)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="training image size (default: 448 for semformer, 224 for caae)")
    parser.add_argument("--backbone", default=None, help="timm model name (default: the paper's)")
    parser.add_argument("--decoder_width", type=int, default=None, help="caae only (default 768)")
    parser.add_argument("--decoder_depth", type=int, default=None, help="caae only (default 8)")
    parser.add_argument("--decoder_heads", type=int, default=None, help="caae only (default 12)")
    args = parser.parse_args(argv)
    if args.kind != "caae" and any(getattr(args, flag) is not None for flag in DECODER_FLAGS):
        parser.error("--decoder_width/--decoder_depth/--decoder_heads apply to --kind caae only")
    return args


def model_kwargs_from_args(args: argparse.Namespace) -> dict:
    """The model arguments given on the command line (the others keep the paper defaults)."""
    given = {
        "num_classes": args.num_classes,
        "class_dim": args.class_dim,
        "image_size": args.image_size,
        "backbone_name": args.backbone,
    }
    if args.kind == "caae":
        given.update({flag: getattr(args, flag) for flag in DECODER_FLAGS})
    return {name: value for name, value in given.items() if value is not None}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state_dict = read_state_dict(args.input)
    try:
        ours, report = import_checkpoint(args.kind, state_dict, **model_kwargs_from_args(args))
    except CheckpointError as error:
        raise CheckpointError(f"{args.input}: {error}") from error
    with atomic_path(args.output) as temporary:
        write_tensors(ours, temporary)
    config = {**_class_shape(args.kind, state_dict), **model_kwargs_from_args(args)}
    write_card(args.output, describe_model(args.kind, config.pop("num_classes"), config))  # what later stages rebuild
    print(f"{args.input} -> {args.output} (+ {args.output.with_suffix('.json').name})")
    print(report.summary())


if __name__ == "__main__":
    run_main(main)

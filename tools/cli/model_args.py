"""Architecture flags of the ViT models, and the keyword arguments a later stage rebuilds a model from.

Training scripts record the keyword arguments that rebuild their model on its card
(``tools.artifacts.model_card``, ``experiments/models/<tag>.json``), so later stages (CAM inference,
SemFormer's frozen CAAE) need no repeated architecture flags. A model without a card is rebuilt from the
flags, whose defaults are the paper's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.backbones.build import CAAE_BACKBONE, SEMFORMER_BACKBONE
from core.backbones.weights import IMAGENET_ALIAS, PRETRAINED_NONE, PRETRAINED_TIMM
from tools.artifacts.files import ArtifactError
from tools.artifacts.model_card import card_path, model_config, read_card
from tools.cli.arguments import given_flags, positive_int

VIT_OVERRIDES = ("depth", "embed_dim", "num_heads", "patch_size")
# Config key -> the architecture flag that sets it (a prefix such as ae_ goes in front, but not for SHARED_FLAGS).
CONFIG_FLAGS = {
    "backbone_name": "backbone", "image_size": "image_size", "class_dim": "class_dim", "seg_dropout": "seg_dropout",
    "decoder_width": "decoder_width", "decoder_depth": "decoder_depth", "decoder_heads": "decoder_heads",
    "reduction": "reduction", **{f"backbone_kwargs.{name}": f"vit_{name}" for name in VIT_OVERRIDES},
}
SHARED_FLAGS = ("class_dim",)  # one flag for SemFormer and its CAAE


def add_pretrained_arg(parser: argparse.ArgumentParser, source: str) -> None:
    """``--pretrained imagenet|none|PATH`` of a ResNet training script, ``imagenet`` (the original) by default."""
    parser.add_argument("--pretrained", default="imagenet", metavar="imagenet|none|PATH",
                        help=f"imagenet: {source}'s ImageNet weights (downloaded once; the original); none: random "
                             "init; PATH: a local .pth / .safetensors file of them, for offline machines")


def add_backbone_pretrained_arg(parser: argparse.ArgumentParser) -> None:
    """``--pretrained timm|none|PATH`` of a ViT training script: the ``--backbone`` tag's own weights by default."""
    parser.add_argument(
        "--pretrained", default=PRETRAINED_TIMM, metavar=f"{PRETRAINED_TIMM}|{PRETRAINED_NONE}|PATH",
        help=f"{PRETRAINED_TIMM}: the weights of the --backbone timm tag (the paper's DeiT: ImageNet-1k; DINOv2: "
             f"LVD-142M; CLIP: CLIP's; downloaded once; '{IMAGENET_ALIAS}', the original's name, is accepted for "
             f"ImageNet weights); {PRETRAINED_NONE}: random init; PATH: a local .pth / .safetensors file of them "
             "(timm's layout, or a released one timm converts), for offline machines")


def _add_vit_args(parser: argparse.ArgumentParser, prefix: str, backbone: str, image_size: int) -> None:
    group = parser.add_argument_group(f"{prefix or 'model'} architecture")
    group.add_argument(f"--{prefix}backbone", default=backbone,
                       help="timm name, optionally with its weights' tag (README: supported backbones)")
    group.add_argument(f"--{prefix}image_size", type=positive_int, default=image_size,
                       help="training size, a multiple of the patch size; the patch position grid is resized to it")
    for name in VIT_OVERRIDES:
        group.add_argument(f"--{prefix}vit_{name}", type=positive_int, default=None,
                           help=f"override the timm model's {name} (tiny test / demo models)")


def _vit_config(args: argparse.Namespace, prefix: str) -> dict:
    overrides = {name: getattr(args, f"{prefix}vit_{name}") for name in VIT_OVERRIDES}
    return {
        "backbone_name": getattr(args, f"{prefix}backbone"),
        "image_size": getattr(args, f"{prefix}image_size"),
        "backbone_kwargs": {name: value for name, value in overrides.items() if value is not None},
    }


def add_semformer_args(parser: argparse.ArgumentParser) -> None:
    """SemFormer segmentor flags (paper: DeiT-S at 448 px, class dim 256, token-wise dropout)."""
    _add_vit_args(parser, "", SEMFORMER_BACKBONE, 448)
    parser.add_argument("--class_dim", type=positive_int, default=256)
    parser.add_argument("--seg_dropout", choices=("token", "channel"), default="token",
                        help="token: the original's Dropout2d on (B, N, D), which drops whole tokens")


def semformer_config(args: argparse.Namespace) -> dict:
    """``SemFormerSegmentor`` keyword arguments (without ``num_classes`` and weights)."""
    return {**_vit_config(args, ""), "class_dim": args.class_dim, "seg_dropout": args.seg_dropout}


def add_caae_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """CAAE flags (paper: DeiT-B distilled at 224 px, 8-block decoder of width 768)."""
    _add_vit_args(parser, prefix, CAAE_BACKBONE, 224)
    parser.add_argument(f"--{prefix}decoder_width", type=positive_int, default=768)
    parser.add_argument(f"--{prefix}decoder_depth", type=positive_int, default=8)
    parser.add_argument(f"--{prefix}decoder_heads", type=positive_int, default=12)
    parser.add_argument(f"--{prefix}reduction", choices=("sum", "mean"), default="sum")
    if not prefix:
        parser.add_argument("--class_dim", type=positive_int, default=256)


def caae_config(args: argparse.Namespace, prefix: str = "") -> dict:
    """``CAAE`` keyword arguments (without ``num_classes`` and weights)."""
    config = _vit_config(args, prefix)
    for name in ("decoder_width", "decoder_depth", "decoder_heads", "reduction"):
        config[name] = getattr(args, f"{prefix}{name}")
    config["class_dim"] = args.class_dim
    return config


def load_model_config(model_path: Path, kind: str, fallback: dict, args: argparse.Namespace | None = None,
                      prefix: str = "", flags: dict[str, str] | None = None) -> dict:
    """The keyword arguments on a model's card, or ``fallback`` (the flags) if it has no card.

    With ``args``, an architecture flag given on the command line that disagrees with the card is an
    error naming both values (``flags``: config key -> flag name without ``prefix``; default
    ``CONFIG_FLAGS``), instead of being silently overridden.
    """
    card = read_card(model_path)
    if card is None:
        return dict(fallback)
    content = model_config(card, kind, model_path)
    if args is not None:
        _check_given_flags(card_path(model_path), content, fallback, args, prefix,
                           CONFIG_FLAGS if flags is None else flags)
    return content


def _flat(config: dict) -> dict:
    """``{"backbone_kwargs": {"depth": 2}}`` -> ``{"backbone_kwargs.depth": 2}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


def _check_given_flags(path: Path, saved: dict, fallback: dict, args: argparse.Namespace, prefix: str,
                       flags: dict[str, str]) -> None:
    given, saved, wanted = given_flags(args), _flat(saved), _flat(fallback)
    for key, flag in flags.items():
        name = flag if flag in SHARED_FLAGS else prefix + flag
        if name in given and key in wanted and wanted[key] != saved.get(key, wanted[key]):
            raise ArtifactError(f"{path}: --{name} {wanted[key]} was given but the model was trained with "
                                f"{saved[key]}; drop the flag (the model's description rebuilds it) or pick "
                                "another model")

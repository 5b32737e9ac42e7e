"""A timm model with the weights ``--pretrained`` names: timm's own, none, or a local file.

- ``timm``: the weights of the timm tag (``deit_small_patch16_224`` -> ``fb_in1k``, ImageNet-1k;
  ``vit_small_patch14_dinov2.lvd142m`` -> LVD-142M; ``vit_base_patch16_clip_224.openai`` -> OpenAI's
  CLIP...), downloaded once into the Hugging Face cache by ``timm.create_model(pretrained=True)``.
- ``imagenet``: the old name of ``timm``, kept for the paper's commands; refused for a tag whose
  weights are not ImageNet's.
- ``none``: random initialisation.
- a path: a ``.pth`` / ``.safetensors`` file in timm's layout or a released layout timm converts, read
  as ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` reads it
  (``timm.models.load_state_dict``, then the family's timm ``checkpoint_filter_fn``) and loaded
  strictly, so that a file that does not fit names its keys. Classifier heads are ignored.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg, load_state_dict
from torch import Tensor, nn

from core.checkpoint import load_strict, unreadable_checkpoint
from core.errors import CheckpointError

PRETRAINED_TIMM = "timm"
PRETRAINED_NONE = "none"
IMAGENET_ALIAS = "imagenet"
IMAGENET_TAG = re.compile(r"in(1|12|21|22)k")  # timm tags of weights trained on ImageNet (fb_in1k, augreg_in21k...)
DYNAMIC_SIZE_FLAG = "dynamic_img_size"  # timm's switch for inputs of any size (EVA's rope then follows the grid)
CLASSIFIER_PREFIXES = ("head.", "head_dist.")  # ignored in weight files: the heads are removed


def pretrained_tag(model_name: str) -> str:
    """timm's tag of the weights ``model_name`` loads (the default tag when the name has none)."""
    config = get_pretrained_cfg(model_name)
    return config.tag if config is not None and config.tag else "none"


def create_timm_model(model_name: str, pretrained: str, overrides: dict) -> nn.Module:
    """``timm.create_model(model_name, dynamic_img_size=True, **overrides)`` with the classifier heads
    removed and timm's weights when ``pretrained`` is ``timm`` (or ``imagenet``, where that is what they
    are); a local file is loaded afterwards with ``load_weight_file``. An offline download fails with
    one ``CheckpointError`` line naming ``--pretrained PATH`` and ``--pretrained none``."""
    download = pretrained in (PRETRAINED_TIMM, IMAGENET_ALIAS)
    if pretrained == IMAGENET_ALIAS and not IMAGENET_TAG.search(pretrained_tag(model_name)):
        raise CheckpointError(f"--pretrained imagenet: timm's {model_name} weights are '{pretrained_tag(model_name)}', "
                              "not ImageNet's; pass --pretrained timm for them")
    if not download and pretrained != PRETRAINED_NONE and not Path(pretrained).is_file():
        raise CheckpointError(f"{pretrained}: --pretrained file not found (give {PRETRAINED_TIMM}, {PRETRAINED_NONE} "
                              "or a local timm .pth / .safetensors)")
    try:
        model = timm.create_model(model_name, pretrained=download, **{DYNAMIC_SIZE_FLAG: True}, **overrides)
    except Exception as error:  # offline, proxy, damaged cache: requests, OSError, RuntimeError, ...
        if not download:
            raise
        first_line = str(error).strip().split("\n", 1)[0]
        raise CheckpointError(
            f"cannot fetch timm's {model_name} weights '{pretrained_tag(model_name)}' ({type(error).__name__}: "
            f"{first_line}); on an offline machine pass a local file with --pretrained PATH, or train from "
            "scratch with --pretrained none"
        ) from error
    model.reset_classifier(0)  # the pretraining heads are never used
    return model


def load_weight_file(
    model: nn.Module, path: str | Path, checkpoint_filter: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
) -> None:
    """Load ``path`` into the headless timm ``model`` strictly, after timm's reader and ``checkpoint_filter``
    (the family's timm converter, which also resamples a position embedding of another grid)."""
    try:
        state = checkpoint_filter(load_state_dict(str(path)), model)
    except Exception as error:  # torch, safetensors and the converters raise many types for damaged files
        raise unreadable_checkpoint(Path(path), error) from error
    state = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIXES)}
    load_strict(model, state, path)

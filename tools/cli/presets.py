"""One table of model sizes (``data/presets.json``): ``tiny`` (tests, smoke recipe, tiny benchmarks),
``demo`` (``make demo``) and ``paper`` (the original's ViTs), read by the recipes, the benchmarks and
the tests instead of copies of the same numbers.

A preset gives, per model (``semformer``, ``caae``), the timm backbone and the ViT sizes that override
timm's (``depth``, ``embed_dim``, ``num_heads``, ``patch_size``).
"""
from __future__ import annotations

from functools import cache
from typing import Any

from tools.artifacts.files import read_json
from tools.cli.repository import REPOSITORY

PRESETS_FILE = REPOSITORY / "data" / "presets.json"
SIZES = ("tiny", "demo", "paper")
MODELS = ("semformer", "caae")


@cache
def _table() -> dict[str, Any]:
    return read_json(PRESETS_FILE, "preset table")


def preset(size: str, model: str = "semformer") -> dict[str, Any]:
    """``{"backbone": name, <ViT size overrides>}`` of ``model`` at ``size``."""
    if size not in SIZES or model not in MODELS:
        raise ValueError(f"presets are {SIZES} x {MODELS}, got {size!r}, {model!r}")
    return dict(_table()[size][model])


def vit_kwargs(size: str, model: str = "semformer") -> dict[str, Any]:
    """The ``backbone_name`` / ``backbone_kwargs`` keyword arguments of ``CAAE`` / ``SemFormerSegmentor``."""
    overrides = preset(size, model)
    return {"backbone_name": overrides.pop("backbone"), "backbone_kwargs": overrides}


def vit_flags(size: str, model: str = "semformer", prefix: str = "") -> list[str]:
    """The same as command-line flags: ``--backbone NAME --vit_depth N ...`` (``prefix``: e.g. ``ae_``)."""
    overrides = preset(size, model)
    flags = [f"--{prefix}backbone", overrides.pop("backbone")]
    for name, value in overrides.items():
        flags += [f"--{prefix}vit_{name}", str(value)]
    return flags


def recipe_variables() -> dict[str, str]:
    """``{VIT_<size>}`` for the recipes' commands: the SemFormer/CAAE ViT flags of each size (tiny and
    demo use one ViT for both models)."""
    return {f"VIT_{size}": " ".join(vit_flags(size)) for size in SIZES}

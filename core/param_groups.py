"""Optimiser parameter groups, declared by each model (``model.parameter_groups()``).

A group names its parameters, their learning-rate multiplier and whether weight decay applies. The
original's layout (docs/method.md §10.1) has four groups: pretrained weights (1x lr, decayed),
pretrained biases and other non-weight tensors (2x, not decayed), new weights (10x, decayed) and new
biases (20x, not decayed). An ablation changes a model's ``parameter_groups`` and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

WEIGHT_MARKER = "weight"
# (name, lr multiplier, decayed) of the original's groups 0..3, in its order.
ORIGINAL_LAYOUT = (
    ("pretrained_weights", 1.0, True),
    ("pretrained_biases", 2.0, False),
    ("new_weights", 10.0, True),
    ("new_biases", 20.0, False),
)


@dataclass(frozen=True)
class ParameterGroup:
    """Parameters trained with ``lr * lr_multiplier`` and, if ``decayed``, the weight decay."""

    name: str
    params: list[nn.Parameter]
    lr_multiplier: float = 1.0
    decayed: bool = True


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that trains (``requires_grad``)."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def original_groups(model: nn.Module, pretrained: tuple[str, ...]) -> list[ParameterGroup]:
    """The original's four groups of the trainable parameters (always four; some may be empty).

    A parameter is pretrained if its name starts with one of the ``pretrained`` prefixes (the
    ImageNet-initialised modules), and a weight if its own name contains 'weight' (so norms' scales
    are weights, while tokens and position embeddings are biases, as in the original).
    """
    members: list[list[nn.Parameter]] = [[] for _ in ORIGINAL_LAYOUT]
    for name, parameter in trainable(model):
        is_pretrained = name.startswith(pretrained)
        is_weight = WEIGHT_MARKER in name.rsplit(".", 1)[-1]
        members[(0 if is_pretrained else 2) + (0 if is_weight else 1)].append(parameter)
    return [ParameterGroup(name, params, multiplier, decayed)
            for (name, multiplier, decayed), params in zip(ORIGINAL_LAYOUT, members)]


def check_groups(model: nn.Module, groups: list[ParameterGroup]) -> None:
    """Every trainable parameter of ``model`` in exactly one group, and no frozen or foreign one."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        for parameter in group.params:
            key = id(parameter)
            if key not in names:
                raise ValueError(f"group '{group.name}' holds a parameter that is not the model's")
            if not parameter.requires_grad:
                raise ValueError(f"group '{group.name}' holds the frozen parameter {names[key]}")
            if key in seen:
                raise ValueError(f"{names[key]} is in groups '{seen[key]}' and '{group.name}'")
            seen[key] = group.name
    missing = [name for name, parameter in trainable(model) if id(parameter) not in seen]
    if missing:
        raise ValueError(f"{type(model).__name__}.parameter_groups() leaves out the trainable "
                         f"parameter(s) {', '.join(missing[:5])}: declare their group")

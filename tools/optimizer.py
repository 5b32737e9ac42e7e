"""The original's optimiser: four parameter groups, SGD with its momentum-slot quirk, poly decay
(and AdamW as an option).

docs/method.md §10.1 and §9 (``tools/ai/optim_utils.py``,
``core/abc_modules.py`` in the original).
"""
from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("sgd", "adamw")
PRETRAINED_MARKERS = ("model", "stage", "backbone")
WEIGHT_MARKER = "weight"
POLY_POWER = 0.9
# (name, lr multiplier, decayed) of groups 0..3, in the original's order.
GROUP_LAYOUT = (
    ("pretrained_weights", 1.0, True),
    ("pretrained_biases", 2.0, False),
    ("new_weights", 10.0, True),
    ("new_biases", 20.0, False),
)


def group_index(name: str) -> int:
    """Group of a parameter name: pretrained if it contains 'model', 'stage' or 'backbone';
    a weight if it contains 'weight' (everything else, e.g. tokens and positional embeddings, is a 'bias')."""
    pretrained = any(marker in name for marker in PRETRAINED_MARKERS)
    return (0 if pretrained else 2) + (0 if WEIGHT_MARKER in name else 1)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, multipliers: bool = True) -> list[dict]:
    """SGD parameter groups of the trainable (``requires_grad``) parameters.

    With ``multipliers`` the original's four groups (always four, some may be empty):
    0 pretrained weights (1x lr, wd), 1 pretrained non-weights (2x, 0), 2 new weights (10x, wd),
    3 new non-weights (20x, 0). Without (AffinityNet's PolyOptimizer): one group, lr and wd for all.
    """
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not multipliers:
        return [{"name": "all", "params": [parameter for _, parameter in trainable],
                 "lr": lr, "weight_decay": weight_decay}]
    members: list[list[nn.Parameter]] = [[] for _ in GROUP_LAYOUT]
    for name, parameter in trainable:
        members[group_index(name)].append(parameter)
    return [
        {"name": group_name, "params": params, "lr": lr * multiplier,
         "weight_decay": weight_decay if decayed else 0.0}
        for (group_name, multiplier, decayed), params in zip(GROUP_LAYOUT, members)
    ]


def build_optimizer(
    groups: list[dict], lr: float, weight_decay: float, momentum: float | None = None, nesterov: bool = True,
    kind: str = "sgd",
) -> Optimizer:
    """SGD (the original) or AdamW over ``groups`` (each carries its own lr and weight_decay).

    For SGD, ``momentum=None`` reproduces the original, which called ``SGD(params, lr, weight_decay, ...)``
    and so put ``weight_decay`` in the momentum slot: effective momentum = ``weight_decay`` (5e-4 / 1e-4),
    dampening 0, Nesterov. Pass ``momentum=0.9`` for the intended optimiser. AdamW (decoupled weight
    decay, default betas) ignores ``momentum`` and ``nesterov``.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "adamw":
        return AdamW(groups, lr=lr, weight_decay=weight_decay)
    effective_momentum = weight_decay if momentum is None else momentum
    if effective_momentum < 0:
        raise ValueError(f"--momentum must be >= 0, got {effective_momentum}")
    # Nesterov needs a non-zero momentum; with momentum 0 both variants are plain SGD.
    return SGD(groups, lr=lr, momentum=effective_momentum, dampening=0.0,
               nesterov=nesterov and effective_momentum > 0)


class PolyDecay:
    """lr factor ``(1 - t / max_step) ** power`` for step ``t`` (1 at the first step, 0 from max_step on)."""

    def __init__(self, max_step: int, power: float = POLY_POWER) -> None:
        if max_step <= 0:
            raise ValueError(f"poly schedule needs max_step > 0, got {max_step}")
        self.max_step, self.power = max_step, power

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_step) ** self.power


def build_poly_scheduler(optimizer: Optimizer, max_step: int, power: float = POLY_POWER) -> LambdaLR:
    """Poly decay of every group's initial lr; call ``scheduler.step()`` after each optimiser step."""
    return LambdaLR(optimizer, PolyDecay(max_step, power))

"""The original's optimiser: the groups each model declares, SGD with its momentum-slot quirk, poly
decay (and AdamW as an option).

docs/method.md §10.1 and §9 (``tools/ai/optim_utils.py``,
``core/abc_modules.py`` in the original).
"""
from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from core.param_groups import check_groups

OPTIMIZERS = ("sgd", "adamw")
POLY_POWER = 0.9


def parameter_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Optimiser groups from ``model.parameter_groups()`` (``core.param_groups``): each group's lr is
    ``lr * lr_multiplier``, its weight decay ``weight_decay`` or 0. The declared groups must hold every
    trainable parameter exactly once (``check_groups``)."""
    if not hasattr(model, "parameter_groups"):
        raise TypeError(f"{type(model).__name__} declares no parameter_groups() (see core/param_groups.py)")
    declared = model.parameter_groups()
    check_groups(model, declared)
    return [{"name": group.name, "params": group.params, "lr": lr * group.lr_multiplier,
             "weight_decay": weight_decay if group.decayed else 0.0} for group in declared]


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

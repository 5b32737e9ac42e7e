"""The original's optimiser: the groups each model declares, SGD with its momentum-slot quirk, poly
decay (and AdamW as an option).

docs/method.md §10.1 and §9 (``tools/ai/optim_utils.py``,
``core/abc_modules.py`` in the original).
"""
from __future__ import annotations

import math

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from core.param_groups import check_groups

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
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


class LearningRateFactor:
    """lr factor of optimiser step ``t``: a linear warm-up from ``1 / warmup_iters`` to 1 over the first
    ``warmup_iters`` steps, then ``poly`` ``(1 - t / max_step) ** 0.9`` (the original), ``cosine``
    ``(1 + cos(pi * u)) / 2`` with ``u`` the fraction of the post-warm-up steps done, or ``constant`` 1.
    Without warm-up, step 0 has factor 1 and ``max_step`` factor 0 (poly, cosine)."""

    def __init__(self, schedule: str, max_step: int, warmup_iters: int = 0, power: float = POLY_POWER) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
        if max_step <= 0:
            raise ValueError(f"a schedule needs max_step > 0, got {max_step}")
        if not 0 <= warmup_iters < max_step:
            raise ValueError(f"--warmup_iters {warmup_iters} must be below the {max_step} training iterations")
        self.schedule, self.max_step, self.warmup_iters, self.power = schedule, max_step, warmup_iters, power

    def __call__(self, step: int) -> float:
        if step < self.warmup_iters:
            return (step + 1) / self.warmup_iters
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "poly":
            return max(0.0, 1.0 - step / self.max_step) ** self.power
        done = min(1.0, (step - self.warmup_iters) / (self.max_step - self.warmup_iters))
        return 0.5 * (1.0 + math.cos(math.pi * done))


def build_scheduler(optimizer: Optimizer, schedule: str, max_step: int, warmup_iters: int = 0) -> LambdaLR:
    """Every group's initial lr times ``LearningRateFactor``; call ``scheduler.step()`` after each
    optimiser step."""
    return LambdaLR(optimizer, LearningRateFactor(schedule, max_step, warmup_iters))

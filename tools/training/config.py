"""The training flags every training script shares (the original's names) and the engine's settings.

``add_engine_args`` adds them with each script's paper defaults; ``TrainConfig.from_args`` checks them
together and hands them to ``tools.training.engine.Trainer``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tools.artifacts.paths import ExperimentPaths
from tools.cli.arguments import (UsageError, non_negative_float, non_negative_int, parse_bool, positive_float,
                                 positive_int)
from tools.training.optimizer import OPTIMIZERS, SCHEDULES
from tools.training.precision import AMP_CHOICES

SELECT_CHOICES = ("gt", "last")
RESUME_MODES = ("no", "yes", "auto")  # no: a fresh tag only; yes: continue its checkpoint; auto: whichever fits
MINUTES_SUFFIX = "m"


def checkpoint_interval(text: str | None) -> tuple[int | None, float | None]:
    """``--checkpoint_every``: ``N`` iterations or ``Nm`` minutes -> ``(iterations, seconds)`` (one is None)."""
    if text is None:
        return None, None
    minutes = text.endswith(MINUTES_SUFFIX)
    try:
        value = float(text[:-1]) if minutes else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N (iterations) or Nm (minutes), got {text!r}") from None
    if not value > 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return (None, value * 60.0) if minutes else (int(value), None)


def checkpoint_every(text: str) -> str:
    """argparse type of ``--checkpoint_every`` (checked, kept as written)."""
    checkpoint_interval(text)
    return text


@dataclass(frozen=True)
class TrainConfig:
    """Engine settings; ``batch_size`` is the global batch (all ranks and accumulation steps together)."""

    tag: str
    max_epoch: int | None
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float | None = None
    nesterov: bool = True
    accum_steps: int = 1
    amp: str = "off"
    num_workers: int = 0
    seed: int = 0
    print_ratio: float = 0.1
    select_by: str = "gt"
    experiments_dir: str = "experiments"
    resume: str = "no"
    max_iters: int | None = None
    optimizer: str = "sgd"
    eval_every: int = 1
    overwrite: bool = False
    schedule: str = "poly"
    warmup_iters: int = 0
    clip_grad_norm: float | None = None
    checkpoint_every: str | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.tag:
            raise UsageError("--tag must not be empty: it names the model, logs and checkpoint")
        if (self.max_epoch is None) == (self.max_iters is None):
            raise UsageError("give exactly one of max_epoch and max_iters")
        for name in ("max_epoch", "max_iters", "batch_size", "eval_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")
        if self.amp not in AMP_CHOICES:
            raise UsageError(f"--amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if isinstance(self.resume, bool):  # the API's True / False
            object.__setattr__(self, "resume", "yes" if self.resume else "no")
        if self.resume not in RESUME_MODES:
            raise UsageError(f"--resume must be one of {RESUME_MODES}, got {self.resume!r}")
        if self.resume != "no" and self.overwrite:
            raise UsageError("--resume continues the tag's run and --overwrite starts it again: give one")
        if self.select_by not in SELECT_CHOICES:
            raise UsageError(f"--select_by must be one of {SELECT_CHOICES}, got {self.select_by!r}")
        if not 0.0 < self.print_ratio <= 1.0:
            raise UsageError(f"--print_ratio must be in (0, 1], got {self.print_ratio}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """From the flags of ``add_engine_args`` plus ``--experiments_dir`` (``tools.cli.add_dataset_args``)."""
        return cls(
            tag=args.tag, max_epoch=getattr(args, "max_epoch", None), batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.wd, momentum=args.momentum, nesterov=args.nesterov,
            accum_steps=args.accum_steps, amp=args.amp, num_workers=args.num_workers, seed=args.seed,
            print_ratio=args.print_ratio, select_by="last" if args.select_by == "last" else "gt",
            experiments_dir=str(args.experiments_dir), resume=args.resume,
            max_iters=getattr(args, "max_iters", None), optimizer=args.optimizer, eval_every=args.eval_every,
            overwrite=args.overwrite, schedule=args.schedule, warmup_iters=args.warmup_iters,
            clip_grad_norm=args.clip_grad_norm, checkpoint_every=args.checkpoint_every,
            max_steps=args.max_steps,
        )

    @property
    def paths(self) -> ExperimentPaths:
        return ExperimentPaths(Path(self.experiments_dir))


def add_engine_args(
    parser: argparse.ArgumentParser, *, batch_size: int, lr: float, wd: float, num_workers: int,
    max_epoch: int | None = None, max_iters: int | None = None, tag: str | None = None, select_by: str = "gt",
    best_choice: str = "gt", momentum: float | None = None, nesterov: bool = True,
) -> None:
    """The shared training flags, with the original's names; each script passes its paper defaults.

    A script trains for ``--max_epoch`` epochs or, if it passes ``max_iters`` instead, for
    ``--max_iters`` optimiser steps (the last epoch may then be partial). ``momentum=None`` keeps the
    original's momentum-slot quirk as the default. ``best_choice`` names the ``--select_by`` value
    that keeps the best-scoring model (``gt`` where the score uses training ground truth, ``val`` for
    the segmentation stage).
    ``--experiments_dir`` is not added here: it comes with ``tools.cli.add_dataset_args``.
    """
    group = parser.add_argument_group("training engine")
    group.add_argument("--tag", default=tag, required=tag is None,
                       help="experiment name: models/<tag>.pth, logs/<tag>.*, tensorboards/<tag>/")
    group.add_argument("--batch_size", type=positive_int, default=batch_size,
                       help="global batch over all processes and accumulation steps")
    if (max_epoch is None) == (max_iters is None):
        raise ValueError("add_engine_args needs exactly one of max_epoch and max_iters")
    if max_iters is None:
        group.add_argument("--max_epoch", type=positive_int, default=max_epoch)
    else:
        group.add_argument("--max_iters", type=positive_int, default=max_iters, help="optimiser steps in all")
    group.add_argument("--max_steps", type=positive_int, default=None, metavar="N",
                       help="a short run (run_pipeline.py --preflight): N optimiser steps as one epoch, ended as a "
                            "run's last epoch (evaluation, model saved and marked finished); a training set smaller "
                            "than N batches is repeated to fill them")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                       help="sgd (the original's) or adamw (which ignores --momentum and --nesterov)")
    group.add_argument("--schedule", choices=SCHEDULES, default="poly",
                       help="lr decay over the run: poly (power 0.9, the original), cosine or constant")
    group.add_argument("--warmup_iters", type=non_negative_int, default=0,
                       help="linear lr warm-up over this many first iterations (the original: none)")
    group.add_argument("--clip_grad_norm", type=positive_float, default=None,
                       help="clip the gradients' global norm to this value (the original: no clipping)")
    group.add_argument("--lr", type=positive_float, default=lr, help="base lr (x1/2/10/20 per parameter group)")
    group.add_argument("--wd", type=non_negative_float, default=wd, help="weight decay")
    group.add_argument("--momentum", type=non_negative_float, default=momentum,
                       help="SGD momentum" + ("; default: the original's quirk, momentum = --wd (0.9 = the fix)"
                                              if momentum is None else ""))
    group.add_argument("--nesterov", type=parse_bool, default=nesterov)
    group.add_argument("--accum_steps", type=positive_int, default=1,
                       help="split each global batch into this many micro-batches per process")
    group.add_argument("--amp", choices=AMP_CHOICES, default="off",
                       help="mixed precision: off (fp32 with TF32 matmuls on CUDA, as the original), bf16, fp16 "
                            "(with a gradient scaler) or auto (bf16 on CUDA where supported, off on the CPU)")
    group.add_argument("--num_workers", type=non_negative_int, default=num_workers)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--print_ratio", type=float, default=0.1, help="log every this fraction of an epoch")
    group.add_argument("--eval_every", type=positive_int, default=1,
                       help="evaluate (and select the model) every N epochs and after the last one")
    group.add_argument("--select_by", choices=(best_choice, "last"),
                       default=best_choice if select_by == "gt" else "last",
                       help=f"{best_choice}: keep the model with the best evaluation score; last: the final epoch's")
    restart = group.add_mutually_exclusive_group()
    restart.add_argument("--resume", nargs="?", const="yes", default="no", choices=RESUME_MODES, metavar="auto",
                         help="continue the run from models/<tag>.last.pth (same flags otherwise); --resume auto: "
                              "continue it when there is one, else start (one command for a first start, a "
                              "torchrun restart and a scheduler's requeue; torchrun's restarts do this by themselves)")
    group.add_argument("--checkpoint_every", type=checkpoint_every, default=None, metavar="N|Nm",
                       help="also write the full checkpoint every N iterations or N minutes (default: at each "
                            "epoch's end and on SIGINT/SIGTERM only); a resume from it equals the uninterrupted run")
    restart.add_argument("--overwrite", action="store_true",
                         help="train from scratch on a tag that already holds a model or checkpoint, replacing them")

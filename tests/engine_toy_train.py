"""A tiny training script on tools.training.engine, for tests/test_engine.py (run as a script or call ``main``).

    PYTHONPATH=. python tests/engine_toy_train.py --experiments_dir /tmp/toy [--resume] ...

Test-only flags: ``--step_delay`` slows each step (time to send a signal mid-epoch),
``--die_during_save N`` SIGKILLs the process half-way through writing the N-th checkpoint,
``--dump PATH`` writes each rank's parameters and gradients after training to ``PATH.rank<r>.pt``.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import signal
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from core.param_groups import ParameterGroup, original_groups
from tools.training.config import TrainConfig, add_engine_args
from tools.training.distributed import destroy_distributed, init_distributed
from tools.training.engine import FitResult, Trainer
from tools.training.logger import TrainingLogger
from tools.training.optimizer import build_optimizer, parameter_groups
from tools.training.sampling import seed_everything

CLASSES = 3
CHANNELS = 4
IMAGE_SIZE = 6
DATA_SEED = 1234


class ToyNet(nn.Module):
    """Parameter names covering the four optimiser groups, plus a frozen layer the export drops:
    ``backbone.*.weight`` (0), ``backbone.*.bias`` / ``stage_scale`` (1), ``head.1.weight`` (2),
    ``head.1.bias`` / ``class_token`` (3)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, CHANNELS, 3, padding=1), nn.GroupNorm(2, CHANNELS), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.stage_scale = nn.Parameter(torch.ones(CHANNELS))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(CHANNELS, CLASSES))
        self.class_token = nn.Parameter(torch.zeros(CLASSES))
        self.frozen = nn.Linear(CHANNELS, CHANNELS)
        self.frozen.requires_grad_(False)

    def parameter_groups(self) -> list[ParameterGroup]:
        """The original's four groups, ``stage_scale`` counted as pretrained (its name matched the
        original's 'stage' marker)."""
        return original_groups(self, pretrained=("backbone.", "stage_scale"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, CLASSES)``."""
        return self.head(self.backbone(images) * self.stage_scale) + self.class_token


class ToyDataset(Dataset):
    """Fixed random images and labels; augmentation draws from python, numpy and torch RNGs."""

    def __init__(self, samples: int) -> None:
        generator = torch.Generator().manual_seed(DATA_SEED)
        self.images = torch.randn(samples, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        self.labels = torch.randint(0, CLASSES, (samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if random.random() < 0.5:
            image = image.flip(-1)
        image = image * float(np.random.uniform(0.8, 1.2)) + 0.1 * torch.randn_like(image)
        return image, self.labels[index]


def toy_step(model: nn.Module, batch: Any, delay: float = 0.0) -> dict[str, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    if delay:
        time.sleep(delay)
    return {"loss": F.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(1) == labels).float().mean()}


def export_without_frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in model.state_dict().items() if not name.startswith("frozen.")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_engine_args(parser, batch_size=8, max_epoch=3, lr=0.1, wd=1e-4, num_workers=0, tag="toy")
    parser.add_argument("--experiments_dir", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--die_during_save", type=int, default=0)
    parser.add_argument("--dump", default=None)
    return parser


def main(argv: list[str] | None = None) -> FitResult:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    config = TrainConfig.from_args(args)
    context = init_distributed()
    try:
        seed_everything(config.seed)
        model = ToyNet(args.dropout)
        dataset = ToyDataset(args.samples)
        groups = parameter_groups(model, config.lr, config.weight_decay)
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        logger = TrainingLogger(config.paths, config.tag, enabled=context.is_main)

        def evaluate(module: nn.Module) -> dict[str, float]:
            logits = module(dataset.images.to(context.device))
            logger.add_image("Evaluation/first_image", dataset.images[0].sigmoid())
            return {"score": -F.cross_entropy(logits, dataset.labels.to(context.device)).item()}

        trainer = Trainer(
            config, context, model, optimizer, dataset,
            lambda module, batch: toy_step(module, batch, args.step_delay),
            evaluate=evaluate, export_state=export_without_frozen, logger=logger, script_args=vars(args),
        )
        if args.die_during_save:
            _die_during_save(config.paths.checkpoint(config.tag).name, args.die_during_save)
        result = trainer.fit()
        if args.dump:
            torch.save({
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
            }, f"{args.dump}.rank{context.rank}.pt")
        return result
    finally:
        destroy_distributed()


def _die_during_save(checkpoint_name: str, on_write: int) -> None:
    """Make the ``on_write``-th checkpoint write stop half-way with SIGKILL, like a power cut."""
    original_save = torch.save
    writes = 0

    def save(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal writes
        if checkpoint_name in str(target):
            writes += 1
            if writes == on_write:
                buffer = io.BytesIO()
                original_save(obj, buffer)
                with open(target, "wb") as handle:
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        original_save(obj, target, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    main()

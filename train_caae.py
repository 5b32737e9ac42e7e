"""Train the class-aware autoencoder (CAAE) that SemFormer's class losses are measured with.

    python train_caae.py --tag CAAE@DeiT-B-Dist                       # one GPU or CPU
    torchrun --nproc_per_node 2 train_caae.py --tag CAAE@DeiT-B-Dist  # several GPUs

Paper settings are the defaults: DeiT-B distilled at 224 px, batch 64, 200 epochs on train_aug,
lr 0.025. The model with the best train mAP is saved to ``experiments/models/<tag>.pth``.
"""
from __future__ import annotations

import argparse
import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from core.caae import CAAE
from core.losses import caae_loss
from tools.artifacts.model_card import describe_model
from tools.cli.arguments import StageArgumentParser, non_negative_float, positive_int
from tools.cli.exits import finish_training, run_main
from tools.cli.model_args import add_backbone_pretrained_arg, add_caae_args, caae_config
from tools.cli.stage_data import add_dataset_args, dataset_flags, open_stage_data
from tools.data.datasets import CAMTestDataset, ClassificationDataset
from tools.data.transforms import caae_eval_transform, caae_train_transform
from tools.training.config import TrainConfig, add_engine_args
from tools.training.engine import Trainer, training_processes
from tools.training.optimizer import build_optimizer, parameter_groups
from tools.training.selection import caae_selection_score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    add_dataset_args(parser, domain="train_aug")
    add_engine_args(parser, batch_size=64, max_epoch=200, lr=0.025, wd=5e-4, num_workers=16,
                    tag="CAAE@DeiT-B-Dist")
    add_caae_args(parser)
    add_backbone_pretrained_arg(parser)
    parser.add_argument("--augment", default="colorjitter,randomexpand",
                        help="comma-separated subset of colorjitter,randomexpand")
    parser.add_argument("--eval_domain", default="train", help="list with GT used for checkpoint selection")
    parser.add_argument("--eval_batch_size", type=positive_int, default=64)
    parser.add_argument("--bce_weight", type=non_negative_float, default=1.0)
    parser.add_argument("--mse_weight", type=non_negative_float, default=1.0)
    parser.add_argument("--grad_checkpointing", action="store_true", help="trade compute for memory (timm)")
    return parser.parse_args(argv)


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], bce_weight: float,
               mse_weight: float) -> dict[str, torch.Tensor]:
    """One micro-batch of ``(B, 3, S, S)`` images and ``(B, K-1)`` labels: the background joins the
    labels, and the loss weighs the class similarity (BCE) and the reconstruction (MSE)."""
    images, labels = batch
    labels = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)
    similarity, reconstruction = model(images, labels)
    return caae_loss(similarity, reconstruction, labels, images, bce_weight, mse_weight)


def build_model(args: argparse.Namespace, num_classes: int) -> CAAE:
    """The CAAE of the architecture flags, with ``--pretrained`` encoder weights."""
    return CAAE(num_classes, **caae_config(args), pretrained=args.pretrained,
                grad_checkpointing=args.grad_checkpointing)


def make_train_step(args: argparse.Namespace) -> Callable[[nn.Module, tuple], dict[str, torch.Tensor]]:
    """``train_step`` with the loss weights of the flags."""
    return functools.partial(train_step, bce_weight=args.bce_weight, mse_weight=args.mse_weight)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig.from_args(args)
    data = open_stage_data(args, labels=True)
    with training_processes(config.seed) as context:
        num_classes = data.descriptor.num_classes
        model = build_model(args, num_classes)
        augment = set(filter(None, args.augment.split(",")))
        transform = caae_train_transform(args.image_size, color_jitter="colorjitter" in augment,
                                         expand=(1.0, 3.0) if "randomexpand" in augment else None)
        dataset = ClassificationDataset(data.reader, data.ids, transform)
        groups = parameter_groups(model, config.lr, config.weight_decay)
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        evaluate = None
        if config.select_by == "gt":
            eval_set = CAMTestDataset(data.reader, data.descriptor.read_ids(args.eval_domain),
                                      caae_eval_transform(args.image_size))
            eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=config.num_workers)
            evaluate = functools.partial(caae_selection_score, loader=eval_loader, device=context.device)
        result = Trainer(config, context, model, optimizer, dataset, make_train_step(args), evaluate=evaluate,
                         script_args=vars(args),
                         model_config=describe_model("caae", num_classes, caae_config(args))).fit()
    finish_training(result, config.tag, context.is_main,
                    f"python train_semformer.py --tag SemFormer@{config.tag} --ae_tag {config.tag} "
                    f"--class_dim {args.class_dim} --domain {args.domain} {dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

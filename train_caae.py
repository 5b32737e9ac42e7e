"""Train the class-aware autoencoder (CAAE) that SemFormer's class losses are measured with.

    python train_caae.py --tag CAAE@DeiT-B-Dist                       # one GPU or CPU
    torchrun --nproc_per_node 2 train_caae.py --tag CAAE@DeiT-B-Dist  # several GPUs

Paper settings are the defaults: DeiT-B distilled at 224 px, batch 64, 200 epochs on train_aug,
lr 0.025. The model with the best train mAP is saved to ``experiments/models/<tag>.pth``.
"""
from __future__ import annotations

import argparse
import functools

import torch
from torch import nn
from torch.utils.data import DataLoader

from core.caae import CAAE
from core.losses import caae_loss
from tools.arguments import StageArgumentParser, non_negative_float, positive_int
from tools.cli import add_dataset_args, dataset_flags, finish_training, open_stage_data, run_main
from tools.dataset import CAMTestDataset, ClassificationDataset
from tools.engine import TrainConfig, Trainer, add_engine_args, training_processes
from tools.model_args import add_backbone_pretrained_arg, add_caae_args, caae_config, describe_model
from tools.optimizer import build_optimizer, parameter_groups
from tools.train_eval import caae_selection_score
from tools.transforms import caae_eval_transform, caae_train_transform


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig.from_args(args)
    data = open_stage_data(args)
    with training_processes(config.seed) as context:
        num_classes = data.descriptor.num_classes
        model_config = caae_config(args)
        model = CAAE(num_classes, **model_config, pretrained=args.pretrained,
                     grad_checkpointing=args.grad_checkpointing)
        augment = set(filter(None, args.augment.split(",")))
        transform = caae_train_transform(args.image_size, color_jitter="colorjitter" in augment,
                                         expand=(1.0, 3.0) if "randomexpand" in augment else None)
        dataset = ClassificationDataset(data.reader, data.ids, transform)
        groups = parameter_groups(model, config.lr, config.weight_decay)
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)

        step = functools.partial(train_step, bce_weight=args.bce_weight, mse_weight=args.mse_weight)
        eval_loader = None
        if config.select_by == "gt":
            eval_set = CAMTestDataset(data.reader, data.descriptor.read_ids(args.eval_domain),
                                      caae_eval_transform(args.image_size))
            eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=config.num_workers)
        evaluate = None
        if eval_loader is not None:
            evaluate = functools.partial(caae_selection_score, loader=eval_loader, device=context.device)
        result = Trainer(config, context, model, optimizer, dataset, step, evaluate=evaluate, script_args=vars(args),
                         model_config=describe_model("caae", num_classes, model_config)).fit()
    finish_training(result, config.tag, context.is_main,
                    f"python train_semformer.py --ae_tag {config.tag} {dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

"""Train SemFormer: class tokens on a ViT, guided by a frozen CAAE (needs ``train_caae.py`` first).

    python train_semformer.py --tag SemFormer@CAAE@DeiT-B-Dist --ae_tag CAAE@DeiT-B-Dist
    torchrun --nproc_per_node 2 train_semformer.py --tag SemFormer@CAAE@DeiT-B-Dist --ae_tag CAAE@DeiT-B-Dist

Paper settings are the defaults: DeiT-S, 448 px crops of images resized to a long side in
[224, 896], batch 8, 20 epochs on train_aug, lr 0.005, loss weights 1/1/1/0.075/1. The model with
the best train CAM mIoU is saved (without its CAAE) to ``experiments/models/<tag>.pth``.
"""
from __future__ import annotations

import argparse
import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from core.backbones.base import DEFAULT_ATTN_LAYERS
from core.caae import CAAE
from core.checkpoint import load_weights
from core.losses import LossWeights, semformer_loss
from core.semformer import SemFormer, SemFormerSegmentor, ae_inputs
from tools.artifacts.model_card import describe_model
from tools.artifacts.paths import ExperimentPaths
from tools.artifacts.provenance import model_input
from tools.cli.arguments import StageArgumentParser, UsageError, non_negative_float, positive_int
from tools.cli.exits import finish_training, run_main
from tools.cli.model_args import (add_backbone_pretrained_arg, add_caae_args, add_semformer_args, caae_config,
                                  load_model_config, semformer_config)
from tools.cli.stage_data import add_dataset_args, dataset_flags, open_stage_data
from tools.data.datasets import CAMTestDataset, ClassificationDataset
from tools.data.transforms import IMAGENET_MEAN, IMAGENET_STD, semformer_eval_transform, semformer_train_transform
from tools.training.config import TrainConfig, add_engine_args
from tools.training.engine import Trainer, training_processes
from tools.training.logger import TrainingLogger
from tools.training.optimizer import build_optimizer, parameter_groups
from tools.training.selection import semformer_selection_score

OVERLAY_BATCHES = 3  # CAM overlays of the first evaluation batches go to TensorBoard, as in the original


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    add_dataset_args(parser, domain="train_aug")
    add_engine_args(parser, batch_size=8, max_epoch=20, lr=0.005, wd=5e-4, num_workers=6,
                    tag="SemFormer@CAAE@DeiT-B-Dist")
    add_semformer_args(parser)
    add_backbone_pretrained_arg(parser)
    parser.add_argument("--ae_tag", required=True, help="the CAAE under experiments/models/ (train_caae.py)")
    add_caae_args(parser, prefix="ae_")
    parser.add_argument("--min_image_size", type=positive_int, default=224)
    parser.add_argument("--max_image_size", type=positive_int, default=896)
    parser.add_argument("--augment", default="colorjitter", help="colorjitter or '' (the original ignores "
                        "randomexpand for SemFormer)")
    weights = parser.add_argument_group("loss weights (paper defaults)")
    for name, value in vars(LossWeights()).items():
        weights.add_argument(f"--{name}_weight", type=non_negative_float, default=value)
    parser.add_argument("--masked_suppression", action="store_true",
                        help="fixed behaviour: activation suppression only over valid pixels and present "
                             "classes (the original counts padding as background)")
    parser.add_argument("--eval_domain", default="train", help="list with GT used for checkpoint selection")
    parser.add_argument("--eval_batch_size", type=positive_int, default=8)
    parser.add_argument("--grad_checkpointing", action="store_true", help="trade compute for memory (timm)")
    return parser.parse_args(argv)


def build_segmentor(args: argparse.Namespace, num_classes: int) -> SemFormerSegmentor:
    """The segmentor of the architecture flags, with ``--pretrained`` backbone weights."""
    return SemFormerSegmentor(num_classes, **semformer_config(args), pretrained=args.pretrained,
                              grad_checkpointing=args.grad_checkpointing)


def build_caae(args: argparse.Namespace, num_classes: int, paths: ExperimentPaths) -> tuple[CAAE, int]:
    """The frozen CAAE of ``--ae_tag`` and its input size, rebuilt from its card (or ``--ae_*``)."""
    model_path = paths.model(args.ae_tag)
    ae_config = load_model_config(model_path, "caae", caae_config(args, prefix="ae_"), args, prefix="ae_")
    caae = CAAE(num_classes, **ae_config)
    load_weights(caae, model_path, f"python train_caae.py --tag {args.ae_tag} {dataset_flags(args)}")
    if caae.class_dim != args.class_dim:
        raise UsageError(f"--class_dim {args.class_dim} differs from the CAAE's {caae.class_dim}")
    return caae, ae_config["image_size"]


def make_train_step(args: argparse.Namespace, ae_size: int) -> Callable[[nn.Module, tuple], dict[str, torch.Tensor]]:
    """``train_step`` with the CAAE's input size and the loss settings of the flags."""
    weights = LossWeights(**{name: getattr(args, f"{name}_weight") for name in vars(LossWeights())})
    return functools.partial(train_step, ae_size=ae_size, weights=weights, masked_suppression=args.masked_suppression)


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ae_size: int,
               weights: LossWeights, masked_suppression: bool) -> dict[str, torch.Tensor]:
    """One micro-batch of ``(B, 3, S, S)`` crops, ``(B, K-1)`` labels and ``(B, 4)`` crop boxes: the CAAE
    sees the crops at ``ae_size`` (masks mark the image inside them), and the five loss terms."""
    images, labels, crop_boxes = batch
    labels = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)
    ae_images, grad_masks = ae_inputs(images, crop_boxes, ae_size)
    outputs = model(images, ae_images, labels, grad_masks)
    return semformer_loss(outputs, labels, grad_masks, weights, masked_suppression)


def selection_score(model: SemFormer, loader: DataLoader, num_classes: int, device: torch.device,
                    logger: TrainingLogger) -> dict:
    """Checkpoint selection: the segmentor's CAM mIoU on the ``--eval_domain`` masks; the first
    ``OVERLAY_BATCHES`` batches' CAMs go to TensorBoard."""
    return semformer_selection_score(model.segmentor, loader, num_classes, device,
                                     on_batch=functools.partial(log_cam_overlay, logger))


def log_cam_overlay(logger: TrainingLogger, index: int, images: torch.Tensor, cams: torch.Tensor) -> None:
    """TensorBoard image of the first picture of evaluation batch ``index`` (the first few batches)."""
    if index < OVERLAY_BATCHES:
        logger.add_image(f"CAM/batch{index}", cam_overlay(images[0], cams[0]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig.from_args(args)
    data = open_stage_data(args, labels=True)
    with training_processes(config.seed) as context:
        num_classes = data.descriptor.num_classes
        segmentor = build_segmentor(args, num_classes)
        groups = parameter_groups(segmentor, config.lr, config.weight_decay)  # before the AE joins: never trained
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        caae, ae_size = build_caae(args, num_classes, data.paths)
        model = SemFormer(segmentor, caae)
        transform = semformer_train_transform(args.image_size, args.min_image_size, args.max_image_size,
                                              color_jitter="colorjitter" in args.augment)
        dataset = ClassificationDataset(data.reader, data.ids, transform)
        logger = TrainingLogger(config.paths, config.tag, enabled=context.is_main)
        evaluate = None
        if config.select_by == "gt":
            eval_set = CAMTestDataset(data.reader, data.descriptor.read_ids(args.eval_domain),
                                      semformer_eval_transform(args.image_size))
            eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=config.num_workers)
            evaluate = functools.partial(selection_score, loader=eval_loader, num_classes=num_classes,
                                         device=context.device, logger=logger)
        result = Trainer(config, context, model, optimizer, dataset, make_train_step(args, ae_size),
                         evaluate=evaluate, export_state=SemFormer.segmentor_state_dict, logger=logger,
                         script_args=vars(args),
                         model_config=describe_model("semformer", num_classes, semformer_config(args)),
                         inputs={"caae": model_input(data.paths.model(args.ae_tag))}).fit()
    finish_training(result, config.tag, context.is_main,
                    f"python inference_semformer.py --tag {config.tag} --domain {args.domain}"
                    f"{cra_flag(segmentor.backbone.depth)} {dataset_flags(args)}")


def cra_flag(depth: int) -> str:
    """`` --cra_layers <depth>`` for a backbone shallower than the CAM inference's default CRA blocks (which it
    would refuse), else nothing."""
    return f" --cra_layers {depth}" if depth < DEFAULT_ATTN_LAYERS else ""


def cam_overlay(image: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` picture: the de-normalised image tinted red by the strongest CAM ``(K-1, h, w)``."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    picture = (image.cpu() * std + mean).clamp(0, 1)
    heat = torch.nn.functional.interpolate(cams.max(0).values[None, None], size=picture.shape[-2:],
                                           mode="bilinear", align_corners=False)[0, 0]
    return (0.5 * picture + 0.5 * torch.stack([heat, torch.zeros_like(heat), 1 - heat])).clamp(0, 1)


if __name__ == "__main__":
    run_main(main)

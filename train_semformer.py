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

import torch
from torch import nn
from torch.utils.data import DataLoader

from core.caae import CAAE
from core.checkpoint import load_weights
from core.losses import LossWeights, semformer_loss
from core.semformer import SemFormer, SemFormerSegmentor, ae_inputs
from tools.arguments import StageArgumentParser, non_negative_float, positive_int
from tools.cli import add_dataset_args, dataset_flags, finish_training, open_stage_data, run_main
from tools.dataset import CAMTestDataset, ClassificationDataset
from tools.engine import TrainConfig, Trainer, add_engine_args, training_processes
from tools.logger import TrainingLogger
from tools.model_args import (add_backbone_pretrained_arg, add_caae_args, add_semformer_args, caae_config,
                              describe_model, load_model_config, semformer_config)
from tools.provenance import model_input
from tools.optimizer import build_optimizer, parameter_groups
from tools.train_eval import semformer_selection_score
from tools.transforms import IMAGENET_MEAN, IMAGENET_STD, semformer_eval_transform, semformer_train_transform

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


def build_caae(args: argparse.Namespace, num_classes: int, paths) -> tuple[CAAE, int]:
    """The frozen CAAE of ``--ae_tag`` and its input size, rebuilt from its saved config (or ``--ae_*``)."""
    model_path = paths.model(args.ae_tag)
    ae_config = load_model_config(model_path, "caae", caae_config(args, prefix="ae_"), args, prefix="ae_")
    caae = CAAE(num_classes, **ae_config)
    load_weights(caae, model_path, f"python train_caae.py --tag {args.ae_tag} {dataset_flags(args)}")
    return caae, ae_config["image_size"]


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
    data = open_stage_data(args)
    with training_processes(config.seed) as context:
        num_classes = data.descriptor.num_classes
        model_config = semformer_config(args)
        segmentor = SemFormerSegmentor(num_classes, **model_config, pretrained=args.pretrained,
                                       grad_checkpointing=args.grad_checkpointing)
        groups = parameter_groups(segmentor, config.lr, config.weight_decay)  # before the AE joins: never trained
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        caae, ae_size = build_caae(args, num_classes, data.paths)
        if caae.class_dim != args.class_dim:
            raise SystemExit(f"error: --class_dim {args.class_dim} differs from the CAAE's {caae.class_dim}")
        model = SemFormer(segmentor, caae)
        transform = semformer_train_transform(args.image_size, args.min_image_size, args.max_image_size,
                                              color_jitter="colorjitter" in args.augment)
        dataset = ClassificationDataset(data.reader, data.ids, transform)
        loss_weights = LossWeights(**{name: getattr(args, f"{name}_weight") for name in vars(LossWeights())})

        step = functools.partial(train_step, ae_size=ae_size, weights=loss_weights,
                                 masked_suppression=args.masked_suppression)
        logger = TrainingLogger(config.paths, config.tag, enabled=context.is_main)
        eval_loader = None
        if config.select_by == "gt":
            eval_set = CAMTestDataset(data.reader, data.descriptor.read_ids(args.eval_domain),
                                      semformer_eval_transform(args.image_size))
            eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=config.num_workers)
        evaluate = None
        if eval_loader is not None:
            evaluate = functools.partial(selection_score, loader=eval_loader, num_classes=num_classes,
                                         device=context.device, logger=logger)
        result = Trainer(config, context, model, optimizer, dataset, step, evaluate=evaluate,
                         export_state=SemFormer.segmentor_state_dict,
                         logger=logger, script_args=vars(args),
                         model_config=describe_model("semformer", num_classes, model_config),
                         inputs={"caae": model_input(data.paths.model(args.ae_tag))}).fit()
    finish_training(result, config.tag, context.is_main,
                    f"python inference_semformer.py --tag {config.tag} --domain train_aug {dataset_flags(args)}")


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

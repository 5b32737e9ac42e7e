r"""Train the final segmentation model (DeepLab) on the pseudo labels, or on any folder of label PNGs.

    python train_segmentation.py --tag DeepLabV2@SemFormer \
        --label_name AffinityNet@SemFormer@train@beta=10@exp_times=8@rw@crf=1
    torchrun --nproc_per_node 2 train_segmentation.py --tag DeepLabV2@SemFormer --label_name ...
    python train_segmentation.py --tag DeepLabV2@GT --label_dir ../VOC2012/SegmentationClassAug   # GT sanity

Defaults are the DeepLabV2 recipe most WSSS papers tabulate (SemFormer's own is unpublished):
ResNet-101 with ImageNet weights at output stride 8 and frozen BatchNorm, four summed dilated 3x3
convs as head; 321 px crops of images scaled by one of 0.5, 0.75, ..., 2.0 and flipped; batch 10,
30k iterations, SGD momentum 0.9, lr 2.5e-4 (head weights 10x, head biases 20x without weight
decay), weight decay 5e-4, poly 0.9; background/foreground-balanced cross-entropy. Label value 255
carries no loss. The val mIoU (single scale) is logged after every epoch when val ground truth
exists; the last iteration's model is kept (``--select_by val`` keeps the best val epoch instead,
which tunes on the evaluation set). Writes ``experiments/models/<tag>.pth`` and ``<tag>.json``.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from core.deeplab import ARCHITECTURES, BN_MODES, V3PLUS_CHANNELS, DeepLab
from core.losses import SEGMENTATION_LOSSES, segmentation_loss
from tools.artifacts.folders import require_complete
from tools.artifacts.model_card import describe_model
from tools.artifacts.paths import PNG_SUFFIX, format_scales
from tools.artifacts.provenance import external_input
from tools.cli.arguments import StageArgumentParser, UsageError, parse_scales, positive_int
from tools.cli.exits import finish_training, run_main
from tools.cli.model_args import add_pretrained_arg
from tools.cli.stage_data import StageData, add_dataset_args, dataset_flags, open_stage_data
from tools.cli.stage_outputs import FolderInput, record_inputs
from tools.data.datasets import CAMTestDataset, SegmentationDataset
from tools.data.transforms import (DEEPLAB_CROP_SIZE, DEEPLAB_SCALES, SCALE_MODES, segmentation_eval_transform,
                                   segmentation_train_transform)
from tools.training.config import TrainConfig, add_engine_args
from tools.training.engine import Trainer, training_processes
from tools.training.optimizer import build_optimizer, parameter_groups
from tools.training.selection import segmentation_selection_score

AUTO_BN = "auto"  # --backbone_bn: frozen with pretrained weights, train from random init

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--label_name", help="pseudo-label folder under experiments/predictions/")
    labels.add_argument("--label_dir", help="any folder of <id>.png label maps (255 = ignore), e.g. "
                                            "../VOC2012/SegmentationClassAug for the fully supervised check")
    add_dataset_args(parser, domain="train_aug")
    add_engine_args(parser, batch_size=10, max_iters=30000, lr=2.5e-4, wd=5e-4, num_workers=8,
                    select_by="last", best_choice="val", momentum=0.9, nesterov=False)
    model = parser.add_argument_group("model")
    model.add_argument("--architecture", choices=ARCHITECTURES, default="deeplabv2")
    model.add_argument("--backbone", default="resnet101", help="any torchvision ResNet (resnet18 ... resnet152)")
    model.add_argument("--head_channels", type=positive_int, default=V3PLUS_CHANNELS,
                       help=f"width of the deeplabv3plus pyramid and decoder (default {V3PLUS_CHANNELS}, DeepLabV3+'s)")
    add_pretrained_arg(model, "torchvision's ResNet")
    model.add_argument("--backbone_bn", choices=(AUTO_BN, *BN_MODES), default=AUTO_BN,
                       help="frozen: BatchNorm fixed (the recipes, with ImageNet weights); train: ordinary "
                            "BatchNorm (needed from random init); auto (default): frozen with pretrained weights, "
                            "train with --pretrained none (frozen random statistics are meaningless and diverge, "
                            "so --backbone_bn frozen --pretrained none is refused)")
    recipe = parser.add_argument_group("data and loss")
    recipe.add_argument("--loss", choices=SEGMENTATION_LOSSES, default="balanced_ce",
                        help="balanced_ce: mean of the background and foreground pixels' CE; ce: plain CE")
    recipe.add_argument("--crop_size", type=positive_int, default=DEEPLAB_CROP_SIZE)
    recipe.add_argument("--scales", type=parse_scales, default=DEEPLAB_SCALES,
                        help=f"random scales of the training images (default {format_scales(DEEPLAB_SCALES)})")
    recipe.add_argument("--scale_mode", choices=SCALE_MODES, default="choice",
                        help="choice: one of --scales; uniform: any factor between their min and max")
    recipe.add_argument("--eval_domain", default="val", help="list scored after every epoch, if it has GT masks")
    parser.add_check(lambda args: f"--head_channels applies to --architecture deeplabv3plus only, not {args.architecture}"
                     if args.head_channels != V3PLUS_CHANNELS and args.architecture != "deeplabv3plus" else None)
    parser.add_check(lambda args: "--backbone_bn frozen keeps the BatchNorm statistics of a random init with "
                     "--pretrained none (meaningless; such runs diverge): use --backbone_bn train, the default "
                     "with --pretrained none" if args.backbone_bn == "frozen" and args.pretrained == "none" else None)
    args = parser.parse_args(argv)
    if args.backbone_bn == AUTO_BN:  # resolved here, so the card and the provenance record what trains
        args.backbone_bn = "train" if args.pretrained == "none" else "frozen"
    return args


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss: str,
               ignore_index: int) -> dict[str, torch.Tensor]:
    """Logits of the crops, resized to the labels (bilinear), and their loss."""
    images, labels = batch
    logits = F.interpolate(model(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return segmentation_loss(logits, labels, loss, ignore_index)


def label_inputs(args: argparse.Namespace, data: StageData) -> tuple[Path, dict]:
    """The label PNG folder of ``--label_name`` / ``--label_dir``, complete for the training list, and its
    record (a ``--label_dir`` is external: no provenance)."""
    if args.label_dir:
        folder = Path(args.label_dir)
        require_complete(folder, data.ids, PNG_SUFFIX, "(a folder with one <id>.png per id of the list)")
        return folder, {"labels": external_input(folder)}
    folder = data.paths.predictions(args.label_name)
    command = f"python make_pseudo_labels.py --domain {args.domain} {dataset_flags(args)} ..."
    return folder, record_inputs({"labels": FolderInput(folder, PNG_SUFFIX, command)}, data.ids)


def build_model(args: argparse.Namespace, num_classes: int) -> DeepLab:
    """The DeepLab of the model flags, with ``--pretrained`` backbone weights."""
    return DeepLab(num_classes, **model_config(args), pretrained=args.pretrained)


def model_config(args: argparse.Namespace) -> dict:
    """The keyword arguments that rebuild the model (its card's)."""
    return {"architecture": args.architecture, "backbone": args.backbone, "bn": args.backbone_bn,
            "head_channels": args.head_channels}


def make_train_step(args: argparse.Namespace, ignore_index: int) -> Callable[[nn.Module, tuple], dict[str, torch.Tensor]]:
    """``train_step`` with the loss of the flags."""
    return functools.partial(train_step, loss=args.loss, ignore_index=ignore_index)


def validation_loader(args: argparse.Namespace, data: StageData, num_workers: int) -> DataLoader | None:
    """Whole ``--eval_domain`` images with their GT masks, or None when the list has no masks."""
    if args.eval_domain not in data.descriptor.lists:
        return None
    ids = data.descriptor.read_ids(args.eval_domain)
    if not all(data.reader.mask_path(image_id).is_file() for image_id in ids):
        return None
    dataset = CAMTestDataset(data.reader, ids, segmentation_eval_transform())
    return DataLoader(dataset, batch_size=1, num_workers=num_workers)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig.from_args(args)
    data = open_stage_data(args)
    transform = segmentation_train_transform(args.crop_size, args.scales, args.scale_mode)
    labels, inputs = label_inputs(args, data)
    dataset = SegmentationDataset(data.reader, data.ids, labels, transform)
    dataset.check_files()
    eval_loader = validation_loader(args, data, config.num_workers)
    if eval_loader is None and config.select_by == "gt":
        raise UsageError(f"--select_by val needs ground-truth masks for every id of --eval_domain {args.eval_domain}")
    with training_processes(config.seed) as context:
        num_classes = data.descriptor.num_classes
        model = build_model(args, num_classes)
        groups = parameter_groups(model, config.lr, config.weight_decay)
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        evaluate = None
        if eval_loader is not None:
            evaluate = functools.partial(segmentation_selection_score, loader=eval_loader, num_classes=num_classes,
                                         device=context.device)
        result = Trainer(config, context, model, optimizer, dataset, make_train_step(args, data.descriptor.ignore_index),
                         evaluate=evaluate, script_args=vars(args),
                         model_config=describe_model("deeplab", num_classes, model_config(args)), inputs=inputs).fit()
    finish_training(result, config.tag, context.is_main,
                    f"python inference_segmentation.py --tag {config.tag} --domain {args.eval_domain} "
                    f"{dataset_flags(args, with_list=False)}")


if __name__ == "__main__":
    run_main(main)

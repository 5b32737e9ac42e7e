"""Train AffinityNet's edge branch on the affinity labels of ``make_affinity_labels.py``.

    python train_affinitynet.py --tag AffinityNet@SemFormer \
        --label_name SemFormer@CAAE@DeiT-B-Dist@train@scale=0.5,1.0,1.5,2.0@aff_fg=0.11_bg=0.15

Paper settings are the defaults: ResNet-50 (frozen; ImageNet weights with ``--pretrained imagenet`` or
``--pretrained PATH``), 512 px crops of images resized to a long side in [320, 640], pairs within
radius 10 at stride 4, batch 32, 3 epochs on train_aug, lr 0.1. There is no evaluation: the last
epoch's model is saved to ``experiments/models/<tag>.pth``.
"""
from __future__ import annotations

import argparse
import functools
from typing import Callable

import torch
from torch import nn

from core.affinitynet import AffinityNet, affinity_loss
from core.conventions import CAM_STRIDE
from core.path_index import PathIndex, affinity_targets
from tools.artifacts.model_card import describe_model
from tools.artifacts.paths import PNG_SUFFIX, ExperimentPaths, affinity_label_source
from tools.cli.arguments import StageArgumentParser, positive_int
from tools.cli.exits import finish_training, run_main
from tools.cli.model_args import add_pretrained_arg
from tools.cli.stage_data import add_dataset_args, dataset_flags, open_stage_data
from tools.cli.stage_outputs import FolderInput, record_inputs, recorded_source
from tools.data.datasets import AffinityDataset
from tools.data.transforms import affinity_train_transform
from tools.training.config import TrainConfig, add_engine_args
from tools.training.engine import Trainer, training_processes
from tools.training.optimizer import build_optimizer, parameter_groups

TRAIN_RADIUS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--label_name", required=True, help="affinity-label folder under experiments/predictions/")
    add_dataset_args(parser, domain="train_aug")
    add_engine_args(parser, batch_size=32, max_epoch=3, lr=0.1, wd=1e-4, num_workers=8, select_by="last")
    parser.add_argument("--architecture", default="resnet50", choices=("resnet50", "resnet34", "resnet18"))
    add_pretrained_arg(parser, "torchvision's ResNet")
    parser.add_argument("--image_size", type=positive_int, default=512, help=f"crop size, a multiple of {CAM_STRIDE}")
    parser.add_argument("--min_image_size", type=positive_int, default=320)
    parser.add_argument("--max_image_size", type=positive_int, default=640)
    parser.add_argument("--radius", type=positive_int, default=TRAIN_RADIUS, help="pair radius at stride 4")
    parser.add_argument("--augment", default="colorjitter", help="colorjitter or ''")
    parser.add_check(lambda args: None if args.image_size % CAM_STRIDE == 0
                     else f"--image_size {args.image_size} must be a multiple of {CAM_STRIDE}")
    return parser.parse_args(argv)


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], path_index: PathIndex,
               num_classes: int) -> dict[str, torch.Tensor]:
    """One micro-batch: pair targets of the ``(B, S/4, S/4)`` affinity labels, the edge map's affinities
    of ``(B, 3, S, S)`` crops on the same pairs, and the affinity loss."""
    images, labels = batch
    targets = [affinity_targets(label, path_index, num_classes) for label in labels]
    bg_pos, fg_pos, neg = (torch.stack(kind) for kind in zip(*targets))
    network = getattr(model, "module", model)  # the model inside DDP: affinity() has no parameters
    return affinity_loss(network.affinity(model(images)), bg_pos, fg_pos, neg)


def build_model(args: argparse.Namespace) -> tuple[AffinityNet, PathIndex]:
    """AffinityNet of ``--architecture`` (``--pretrained`` backbone) and the pairs within ``--radius`` on the
    crops' stride-4 grid that it is trained on."""
    grid = args.image_size // CAM_STRIDE
    path_index = PathIndex(args.radius, (grid, grid))
    return AffinityNet(args.architecture, args.pretrained, path_index), path_index


def make_train_step(path_index: PathIndex, num_classes: int) -> Callable[[nn.Module, tuple], dict[str, torch.Tensor]]:
    """``train_step`` on the pairs of ``path_index``."""
    return functools.partial(train_step, path_index=path_index, num_classes=num_classes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig.from_args(args)
    data = open_stage_data(args)
    label_dir = data.paths.predictions(args.label_name)
    command = f"python make_affinity_labels.py --domain {args.domain} {dataset_flags(args)} ..."
    inputs = record_inputs({"labels": FolderInput(label_dir, PNG_SUFFIX, command)}, data.ids)
    with training_processes(config.seed) as context:
        model, path_index = build_model(args)
        transform = affinity_train_transform(args.image_size, args.min_image_size, args.max_image_size,
                                             CAM_STRIDE, color_jitter="colorjitter" in args.augment)
        dataset = AffinityDataset(data.reader, data.ids, label_dir, transform)
        groups = parameter_groups(model, config.lr, config.weight_decay)
        optimizer = build_optimizer(groups, config.lr, config.weight_decay, config.momentum, config.nesterov,
                                    config.optimizer)
        num_classes = data.descriptor.num_classes
        result = Trainer(config, context, model, optimizer, dataset, make_train_step(path_index, num_classes),
                         script_args=vars(args),
                         model_config=describe_model("affinitynet", num_classes, {"backbone": args.architecture}),
                         inputs=inputs).fit()
    finish_training(result, config.tag, context.is_main, random_walk_command(args, config.tag, data.paths))


def random_walk_command(args: argparse.Namespace, tag: str, paths: ExperimentPaths) -> str:
    """The random walk of the CAMs the affinity labels were made from, with this model: the CAM folder as the
    labels' ``run.json`` records it, else as their name (``<cams>@aff_fg=..._bg=...``) tells."""
    label_dir = paths.predictions(args.label_name)
    source = recorded_source(label_dir, "cams", paths)
    if source is None and affinity_label_source(args.label_name) is not None:
        source = [affinity_label_source(args.label_name)]
    walk = f"inference_rw.py --model_name {tag} --domain {args.domain} {dataset_flags(args)}"  # the card: the backbone
    if source is None:
        return (f"{walk}, with --cam_dir the CAM folder that {args.label_name} was made from (neither its "
                "run.json nor its name says which)")
    return f"python {walk} --cam_dir {' '.join(source)}"


if __name__ == "__main__":
    run_main(main)

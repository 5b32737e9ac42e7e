"""Random-walk refinement of the stride-4 CAMs with AffinityNet's edge map.

    python inference_rw.py --model_name AffinityNet@SemFormer \
        --cam_dir SemFormer@CAAE@DeiT-B-Dist@train@scale=0.5,1.0,1.5,2.0 --domain train_aug

reads ``experiments/models/<model_name>.pth`` and the CAMs' ``cam`` arrays (``--cam_dir``: a name under
``predictions/`` or a path; a folder without ``run.json`` needs ``--external``), and writes
``experiments/predictions/<model_name>@train@beta=10@exp_times=8@rw/<id>.npz`` with ``keys`` and
``rw (n, H, W)``. Defaults reproduce the original (radius 5 although training used 10, no background
channel, one global max); ``--background`` and ``--normalize per_class`` are the common variants.
The walk uses a sparse transition matrix: no dense (HW)^2 matrix is ever built.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from core.affinitynet import EDGE_MAP_MIN_SIZE, AffinityNet
from core.checkpoint import load_weights
from core.random_walk import RW_BETA, RW_EXP_TIMES, RW_RADIUS, random_walk, walk_to_image
from tools.artifacts.paths import CAM_SUFFIX, prediction_file, random_walk_name
from tools.artifacts.predictions import load_prediction, save_walk
from tools.cli.arguments import StageArgumentParser, add_shard_args, non_negative_int, positive_float, positive_int
from tools.cli.exits import run_main
from tools.cli.measurements import measured_images
from tools.cli.model_args import load_model_config
from tools.cli.stage_data import (add_dataset_args, add_output_args, dataset_flags, open_stage_data, prediction_folder,
                                  rank_shard, shard)
from tools.cli.stage_outputs import FolderInput, ModelInput, open_stage_output
from tools.data.transforms import normalize
from tools.training.distributed import add_device_arg, inference_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--model_name", required=True, help="AffinityNet tag under experiments/models/")
    parser.add_argument("--cam_dir", required=True, help="CAM experiment under experiments/predictions/, or a path")
    add_dataset_args(parser)
    parser.add_argument("--architecture", default="resnet50",
                        help="AffinityNet backbone, if experiments/models/<model_name>.json does not say")
    parser.add_argument("--beta", type=positive_int, default=RW_BETA)
    parser.add_argument("--exp_times", type=non_negative_int, default=RW_EXP_TIMES, help="walk length = 2^exp_times")
    parser.add_argument("--radius", type=positive_int, default=RW_RADIUS, help="transition radius (training used 10)")
    parser.add_argument("--image_size", type=positive_int, default=EDGE_MAP_MIN_SIZE,
                        help="images are zero-padded to at least this size for the edge map")
    parser.add_argument("--background", type=positive_float, default=None, metavar="POWER",
                        help="also propagate a background channel (1 - max cam)^POWER (original: none)")
    parser.add_argument("--normalize", choices=("global", "per_class"), default="global",
                        help="divide by one global max (original) or by each class's max")
    add_shard_args(parser)
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def output_name(args: argparse.Namespace) -> str:
    """The original's folder name, with a suffix for every non-original option."""
    name = random_walk_name(args.model_name, args.domain, args.beta, args.exp_times)
    if args.radius != RW_RADIUS:
        name += f"@radius={args.radius}"
    if args.background is not None:
        name += f"@bg={args.background:g}"
    if args.normalize != "global":
        name += f"@norm={args.normalize}"
    return name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = open_stage_data(args)
    device = inference_device(args.device)
    cam_dir = prediction_folder(data.paths, args.cam_dir)
    model_path = data.paths.model(args.model_name)
    architecture = load_model_config(model_path, "affinitynet", {"backbone": args.architecture})["backbone"]
    model = AffinityNet(architecture)
    load_weights(model, model_path, f"python train_affinitynet.py --tag {args.model_name} ...")
    model.to(device).eval()
    inputs = {"cams": FolderInput(cam_dir, CAM_SUFFIX, f"python inference_semformer.py --domain {args.domain} "
                                                       f"{dataset_flags(args)} ..."),
              "model": ModelInput(model_path)}
    output = open_stage_output(args, data, Path(__file__).name, inputs, output_name(args), CAM_SUFFIX,
                               rank_shard(shard(data.ids, args.start, args.end)), "random-walk files")
    for image_id in measured_images(tqdm(output.todo, desc="random walk", dynamic_ncols=True)):
        image = data.reader.load_image(image_id)
        cams = load_prediction(prediction_file(cam_dir, image_id), data.descriptor.num_classes,
                               allow_pickle=args.allow_pickle, image_size=(image.height, image.width),
                               require=("cam",))
        with torch.no_grad():
            edge = model.edge_map(normalize(image).to(device), min_size=args.image_size)
            cam = torch.as_tensor(cams["cam"], dtype=torch.float32, device=device)
            rw = random_walk(cam, edge, args.radius, args.beta, args.exp_times, args.background)
            rw = walk_to_image(rw, image.height, image.width, args.normalize)
        rw = rw.cpu().numpy()
        background = rw[0] if args.background is not None else None  # channel 0, before the classes
        save_walk(output.folder / f"{image_id}{CAM_SUFFIX}", cams["keys"], rw[len(rw) - len(cam):], background)
    print(f"Next: python make_pseudo_labels.py --experiment_name {output_name(args)} --domain {args.domain} "
          f"{dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

"""Class activation maps of a trained SemFormer: multi-scale, flipped, weighted by class-relevant attention.

    python inference_semformer.py --tag SemFormer@CAAE@DeiT-B-Dist --domain train_aug

reads ``experiments/models/<tag>.pth`` and writes one ``.npz`` per image (``keys``, stride-4
``cam``, full-resolution ``hr_cam``) to ``experiments/predictions/<tag>@train@scale=0.5,1.0,1.5,2.0/``.
Finished files are skipped when the folder's ``run.json`` records the same settings and model (other
settings stop with an error instead), so a killed run resumes where it stopped; ``--start/--end`` take a
slice of the list and ``torchrun --nproc_per_node N`` splits it across GPUs.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from core.backbones.base import DEFAULT_ATTN_LAYERS
from core.cam import cam_activations, multiscale_cams
from core.checkpoint import read_state_dict
from core.semformer import SemFormerSegmentor, load_segmentor_weights
from tools.artifacts.files import ArtifactError
from tools.artifacts.paths import CAM_SUFFIX, cam_experiment_name
from tools.artifacts.predictions import save_cams
from tools.cli.arguments import (StageArgumentParser, UsageError, add_shard_args, non_negative_int, parse_bool,
                                 parse_scales, positive_int)
from tools.cli.cam_limits import check_cam_inputs
from tools.cli.exits import run_main
from tools.cli.measurements import measured_images
from tools.cli.model_args import add_semformer_args, load_model_config, semformer_config
from tools.cli.stage_data import (add_dataset_args, add_output_args, dataset_flags, evaluation_domain, open_stage_data,
                                  rank_shard, shard)
from tools.cli.stage_outputs import ModelInput, open_stage_output
from tools.data.datasets import CAMMakingDataset
from tools.training.distributed import add_device_arg, inference_device
from tools.training.precision import AMP_CHOICES, autocast

CAM_SCALES = (0.5, 1.0, 1.5, 2.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--tag", required=True, help="SemFormer model under experiments/models/")
    add_dataset_args(parser)
    add_semformer_args(parser)
    parser.add_argument("--scales", type=parse_scales, default=CAM_SCALES, help="comma-separated image scales")
    parser.add_argument("--with_cra", type=parse_bool, default=True,
                        help="weight the activations by class-relevant attention (True/False)")
    parser.add_argument("--cra_layers", type=positive_int, default=DEFAULT_ATTN_LAYERS,
                        help="last blocks whose attention forms the CRA")
    parser.add_argument("--exact_hr_cam", action="store_true",
                        help="resize hr_cam straight to the image size (the original stretches it to a "
                             "multiple of the patch size, 16, and crops, losing up to 15 px)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off",
                        help="autocast of the model (bf16 / fp16; off: full precision, the original's)")
    parser.add_argument("--num_workers", type=non_negative_int, default=2,
                        help="DataLoader workers that decode and resize the photos ahead of the model")
    add_shard_args(parser)
    add_device_arg(parser)
    add_output_args(parser, reads_predictions=False)
    return parser.parse_args(argv)


def build_segmentor(args: argparse.Namespace, num_classes: int, model_path) -> SemFormerSegmentor:
    """The trained segmentor, rebuilt from its saved config (or the flags) and loaded strictly."""
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: model file not found; train it first with:\n"
                            f"  python train_semformer.py --tag {args.tag} --ae_tag <CAAE tag> ...")
    config = load_model_config(model_path, "semformer", semformer_config(args))
    segmentor = SemFormerSegmentor(num_classes, **config)
    load_segmentor_weights(segmentor, read_state_dict(model_path), model_path)
    return segmentor


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = open_stage_data(args, labels=True)
    device = inference_device(args.device)
    model_path = data.paths.model(args.tag)
    segmentor = build_segmentor(args, data.descriptor.num_classes, model_path)
    segmentor.to(device).eval()
    if args.with_cra and not 1 <= args.cra_layers <= segmentor.backbone.depth:
        raise UsageError(f"--cra_layers {args.cra_layers} must lie in 1..{segmentor.backbone.depth} (the backbone's "
                         "depth)")
    activations = functools.partial(cam_activations, segmentor, with_cra=args.with_cra, cra_layers=args.cra_layers)

    name = cam_experiment_name(args.tag, args.domain, args.scales)
    ids = rank_shard(shard(data.ids, args.start, args.end))
    check_cam_inputs(data.reader, ids, args.scales, segmentor.backbone.patch_size, segmentor.num_classes,
                     segmentor.backbone.num_heads, args.cra_layers if args.with_cra else 1)
    output = open_stage_output(args, data, Path(__file__).name, {"model": ModelInput(model_path)}, name, CAM_SUFFIX,
                               ids, "CAM files")
    loader = DataLoader(CAMMakingDataset(data.reader, output.todo, args.scales, segmentor.backbone.patch_size),
                        batch_size=None, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    for image_id, keys, size, inputs in measured_images(tqdm(loader, desc="CAMs", dynamic_ncols=True)):
        inputs = [scaled.to(device, non_blocking=True) for scaled in inputs]
        with autocast(device, args.amp):
            cams = multiscale_cams(activations, inputs, size, keys, segmentor.backbone.patch_size, args.exact_hr_cam)
        save_cams(output.folder / f"{image_id}{CAM_SUFFIX}", cams["keys"], cams["cam"], cams["hr_cam"])
    print(f"Next: python evaluate.py --experiment_name {name} --domain {evaluation_domain(data.descriptor, args)} "
          f"{dataset_flags(args)}\n"
          f"      python make_affinity_labels.py --experiment_name {name} --domain {args.domain} "
          f"{dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

"""Segmentation maps of a trained DeepLab: multi-scale, flipped, refined by a dense CRF.

    python inference_segmentation.py --tag DeepLabV2@SemFormer --domain val
    python inference_segmentation.py --tag DeepLabV2@SemFormer --domain test --submission

reads ``experiments/models/<tag>.pth`` (architecture from ``<tag>.json``) and writes one palette PNG
per image, at the image's size, to ``experiments/predictions/<tag>@<domain>@scale=...@crf=...``.
Defaults are the DeepLabV2 test recipe: scales 0.5-1.75 with flips, logits averaged, then DeepLab's
10-iteration CRF. Finished files are skipped, so a killed run resumes; ``--start/--end`` take a
slice of the list and ``torchrun --nproc_per_node N`` splits it across GPUs. ``--submission`` also
packs the PASCAL VOC evaluation server's ``results.tar.gz`` (after checking every file), named after the
split (``comp6_test_cls`` / ``comp6_val_cls``): the domain test or val, or a ``--list`` holding exactly one
of those lists' ids (any other list is refused, exit status 2).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.checkpoint import load_weights
from core.deeplab import DeepLab
from core.multiscale import DEEPLAB_TEST_SCALES, FUSIONS, multiscale_probabilities
from tools.artifacts.files import save_png
from tools.artifacts.folders import missing_ids
from tools.artifacts.paths import PNG_SUFFIX, format_scales
from tools.cli.arguments import StageArgumentParser, UsageError, add_shard_args, parse_scales
from tools.cli.exits import run_main
from tools.cli.measurements import measured_images
from tools.cli.model_args import load_model_config
from tools.cli.stage_data import (StageData, add_dataset_args, add_jobs_arg, add_output_args, dataset_flags,
                                  open_stage_data, process_rank, rank_shard, shard)
from tools.cli.stage_outputs import ModelInput, open_stage_output
from tools.data.transforms import normalize
from tools.scoring.crf import CRFSetting, parse_crf_setting
from tools.scoring.labels import write_segmentation_png
from tools.scoring.parallel import BackgroundJobs
from tools.scoring.submission import SPLITS, submission_dir, submission_split, write_submission
from tools.training.distributed import add_device_arg, inference_device

RECIPE_MODEL = {"architecture": "deeplabv2", "backbone": "resnet101", "bn": "frozen"}  # when no <tag>.json
WAIT_POLL_SECONDS = 5.0


def crf_argument(text: str) -> CRFSetting | None:
    try:
        return parse_crf_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--tag", required=True, help="DeepLab model under experiments/models/")
    add_dataset_args(parser, domain="val")
    parser.add_argument("--scales", type=parse_scales, default=DEEPLAB_TEST_SCALES,
                        help=f"comma-separated test scales (default {format_scales(DEEPLAB_TEST_SCALES)})")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each scale horizontally flipped")
    parser.add_argument("--fusion", choices=FUSIONS, default="mean_logits",
                        help="mean_logits: softmax of the mean logits; max_prob: per-class max probability")
    parser.add_argument("--crf", type=crf_argument, default=parse_crf_setting("deeplab"), metavar="none|deeplab|N",
                        help="dense CRF on the probabilities: deeplab (10 iterations, DeepLab's kernels; default), "
                             "N iterations with the original's kernels, or none")
    parser.add_argument("--submission", action="store_true",
                        help="also write results/VOC2012/Segmentation/comp6_<split>_cls/ and results.tar.gz "
                             "(split: test or val, the whole list)")
    add_shard_args(parser)
    add_device_arg(parser)
    add_jobs_arg(parser)
    add_output_args(parser, reads_predictions=False)
    return parser.parse_args(argv)


def ids_name(args: argparse.Namespace) -> str:
    """The domain, or the stem of the ``--list`` file."""
    return Path(args.list).stem if args.list else args.domain


def output_name(args: argparse.Namespace) -> str:
    """``<tag>@<domain or list>@scale=<scales>[@noflip][@fusion=max_prob]@crf=<setting>``."""
    name = f"{args.tag}@{ids_name(args)}@scale={format_scales(args.scales)}"
    if not args.flip:
        name += "@noflip"
    if args.fusion != "mean_logits":
        name += f"@fusion={args.fusion}"
    return name + f"@crf={args.crf.name if args.crf else 'none'}"


def build_model(tag: str, num_classes: int, model_path: Path) -> DeepLab:
    """The trained DeepLab, rebuilt from its saved config and loaded strictly."""
    config = load_model_config(model_path, "deeplab", RECIPE_MODEL)
    model = DeepLab(num_classes, **config)
    load_weights(model, model_path, f"python train_segmentation.py --tag {tag} ...")
    return model


def wait_for_other_ranks(out_dir: Path, ids: list[str]) -> None:
    """Under torchrun, rank 0 waits until every rank's files of ``ids`` exist (the other ranks write them)."""
    missing = missing_ids(out_dir, ids, PNG_SUFFIX)
    with tqdm(total=len(ids), initial=len(ids) - len(missing), desc="other ranks", dynamic_ncols=True) as bar:
        while missing:
            time.sleep(WAIT_POLL_SECONDS)
            still = missing_ids(out_dir, missing, PNG_SUFFIX)
            bar.update(len(missing) - len(still))
            missing = still


def checked_split(args: argparse.Namespace, data: StageData) -> str:
    """The server's split of ``--submission``'s ids (the folder ``comp6_<split>_cls``); a ``UsageError`` for
    ids that are not a whole test or val list."""
    split = submission_split(data.descriptor, args.domain, data.ids if args.list else None)
    if split is not None:
        return split
    given = f"--list {args.list}" if args.list else f"--domain {args.domain}"
    raise UsageError(f"{given}: --submission needs a whole {' or '.join(SPLITS)} list (the server's "
                     f"{', '.join(f'comp6_{name}_cls' for name in SPLITS)}), and these ids are neither")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.submission and (args.start, args.end) != (0.0, 1.0):
        raise UsageError("--submission packs the whole list: run the --start/--end shards first, then the same "
                         "command without them plus --submission (finished files are skipped)")
    data = open_stage_data(args)
    split = checked_split(args, data) if args.submission else None
    device = inference_device(args.device)
    model_path = data.paths.model(args.tag)
    model = build_model(args.tag, data.descriptor.num_classes, model_path).to(device).eval()
    name = output_name(args)
    output = open_stage_output(args, data, Path(__file__).name, {"model": ModelInput(model_path)}, name, PNG_SUFFIX,
                               rank_shard(shard(data.ids, args.start, args.end)), "segmentation maps")
    out_dir = output.folder
    palette = data.descriptor.palette
    print(args.crf.describe() if args.crf else "no CRF")
    with BackgroundJobs(args.n_jobs if args.crf else 1) as crf_jobs:
        for image_id in measured_images(tqdm(output.todo, desc="segmentation", dynamic_ncols=True)):
            image = data.reader.load_image(image_id)
            probs = multiscale_probabilities(model, normalize(image).to(device), args.scales, args.flip, args.fusion)
            path = out_dir / f"{image_id}{PNG_SUFFIX}"
            if args.crf is None:
                save_png(path, probs.argmax(0).to(torch.uint8).cpu().numpy(), palette)
            else:
                crf_jobs.submit(write_segmentation_png, path, probs.cpu().numpy(), np.asarray(image), args.crf,
                                palette)
    if process_rank() != 0:
        return
    if args.submission:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            wait_for_other_ranks(out_dir, data.ids)
        archive = write_submission(out_dir, data.ids, data.reader, split)
        print(f"checked {len(data.ids)} files in {submission_dir(out_dir, split)}\n"
              f"submission archive: {archive}")
    if data.reader.mask_path(data.ids[0]).is_file():
        print(f"Next: python evaluate.py --experiment_name {name} --domain {args.domain} --mode png "
              f"{dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

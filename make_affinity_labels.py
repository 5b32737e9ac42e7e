"""Affinity labels for AffinityNet: confident fg / bg from the CAMs, each refined by a label CRF.

    python make_affinity_labels.py --experiment_name <cam experiment> --domain train_aug

reads ``experiments/predictions/<cam experiment>/<id>.npz`` (``keys``, ``hr_cam``) and writes
``experiments/predictions/<cam experiment>@aff_fg=0.11_bg=0.15/<id>.png`` (0 background,
class ids, 255 uncertain). ``--experiment_name`` may be a path to a CAM folder anywhere (named after its
last component); one without ``run.json`` needs ``--external``.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

from tools.artifacts.files import save_png
from tools.artifacts.paths import CAM_SUFFIX, PNG_SUFFIX, affinity_label_name
from tools.cli.arguments import StageArgumentParser, finite_float, non_negative_int
from tools.cli.exits import run_main
from tools.cli.stage_data import (add_dataset_args, add_jobs_arg, add_output_args, dataset_flags, open_stage_data,
                                  prediction_folder)
from tools.cli.stage_outputs import FolderInput, run_label_jobs
from tools.data.voc import VOCReader
from tools.scoring.labels import AFFINITY_CRF_ITERATIONS, affinity_label, photo_and_cams

FG_THRESHOLD, BG_THRESHOLD = 0.11, 0.15  # the paper's: confident foreground above 0.11, background below 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--experiment_name", required=True, help="CAM folder under experiments/predictions/, or a path")
    add_dataset_args(parser)
    parser.add_argument("--fg_threshold", type=finite_float, default=FG_THRESHOLD)
    parser.add_argument("--bg_threshold", type=finite_float, default=BG_THRESHOLD)
    parser.add_argument("--swap_thresholds", action="store_true",
                        help="fixed behaviour: confident fg uses the higher threshold, confident bg the lower "
                             "(the original's 0.11 < 0.15 leaves no uncertain band before the CRF)")
    parser.add_argument("--crf_iteration", type=non_negative_int, default=AFFINITY_CRF_ITERATIONS)
    add_jobs_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Job:
    reader: VOCReader
    cam_dir: Path
    out_dir: Path
    fg_threshold: float
    bg_threshold: float
    crf_iteration: int
    allow_pickle: bool
    num_classes: int


def make_one(job: Job, image_id: str) -> None:
    image, cams = photo_and_cams(job.reader, job.cam_dir, image_id, job.num_classes, job.allow_pickle)
    label = affinity_label(image, cams["hr_cam"], cams["keys"], job.fg_threshold, job.bg_threshold,
                           job.crf_iteration)
    save_png(job.out_dir / f"{image_id}{PNG_SUFFIX}", label)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = open_stage_data(args)
    cam_dir = prediction_folder(data.paths, args.experiment_name)
    command = f"python inference_semformer.py --domain {args.domain} {dataset_flags(args)} ..."
    fg, bg = args.fg_threshold, args.bg_threshold
    if args.swap_thresholds:
        fg, bg = max(fg, bg), min(fg, bg)
    name = affinity_label_name(cam_dir.name, args.fg_threshold, args.bg_threshold)
    if args.swap_thresholds:
        name += "@swapped"
    out_dir = data.paths.predictions(name)
    job = Job(data.reader, cam_dir, out_dir, fg, bg, args.crf_iteration, args.allow_pickle,
              data.descriptor.num_classes)
    run_label_jobs(args, data, Path(__file__).name, {"cams": FolderInput(cam_dir, CAM_SUFFIX, command)}, name,
                   functools.partial(make_one, job), "affinity labels")
    print(f"Next: python train_affinitynet.py --tag AffinityNet@SemFormer --label_name {name} --domain {args.domain} "
          f"{dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

"""Pseudo labels for the segmentation stage from random-walk results (or CAMs).

    python make_pseudo_labels.py --experiment_name <rw experiment> --domain train_aug --crf_iteration 1

reads ``experiments/predictions/<experiment>/<id>.npz`` (``rw``, else ``hr_cam``), thresholds the
background at 0.25, refines with a label CRF and writes palette PNGs (values 0..C-1, no ignore) to
``experiments/predictions/<experiment>@crf=<n>/<id>.png``. ``--experiment_name`` may be a path to a folder
anywhere (named after its last component); one without ``run.json`` needs ``--external``.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.artifacts.files import save_png
from tools.artifacts.paths import CAM_SUFFIX, PNG_SUFFIX, prediction_file, pseudo_label_name
from tools.artifacts.predictions import load_prediction, score_maps
from tools.cli.arguments import StageArgumentParser, finite_float, non_negative_int
from tools.cli.exits import run_main
from tools.cli.stage_data import (add_dataset_args, add_jobs_arg, add_output_args, dataset_flags, evaluation_domain,
                                  open_stage_data, prediction_folder)
from tools.cli.stage_outputs import FolderInput, run_label_jobs
from tools.data.voc import VOCReader
from tools.scoring.labels import scores_to_label

PSEUDO_LABEL_THRESHOLD = 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--experiment_name", required=True, help="refined (random walk, CRF) or CAM folder under predictions/, or a path")
    add_dataset_args(parser)
    parser.add_argument("--threshold", type=finite_float, default=PSEUDO_LABEL_THRESHOLD, help="background score")
    parser.add_argument("--crf_iteration", type=non_negative_int, default=1)
    add_jobs_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Job:
    reader: VOCReader
    in_dir: Path
    out_dir: Path
    palette: np.ndarray
    threshold: float
    crf_iteration: int
    allow_pickle: bool
    num_classes: int


def make_one(job: Job, image_id: str) -> None:
    image = np.array(job.reader.load_image(image_id)) if job.crf_iteration > 0 else None
    size = image.shape[:2] if image is not None else job.reader.image_size(image_id)
    path = prediction_file(job.in_dir, image_id)
    maps = score_maps(load_prediction(path, job.num_classes, allow_pickle=job.allow_pickle, image_size=size), path)
    background = job.threshold if maps.background is None else maps.background  # a propagated one replaces it
    label = scores_to_label(maps.scores, maps.keys, background, image, job.crf_iteration)
    save_png(job.out_dir / f"{image_id}{PNG_SUFFIX}", label, job.palette)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = open_stage_data(args)
    in_dir = prediction_folder(data.paths, args.experiment_name)
    command = f"python inference_rw.py --domain {args.domain} {dataset_flags(args)} ..."
    name = pseudo_label_name(in_dir.name, args.crf_iteration)
    out_dir = data.paths.predictions(name)
    job = Job(data.reader, in_dir, out_dir, data.descriptor.palette, args.threshold, args.crf_iteration,
              args.allow_pickle, data.descriptor.num_classes)
    run_label_jobs(args, data, Path(__file__).name, {"scores": FolderInput(in_dir, CAM_SUFFIX, command)}, name,
                   functools.partial(make_one, job), "pseudo labels")
    print(f"Next: python evaluate.py --experiment_name {name} --domain {evaluation_domain(data.descriptor, args)} "
          f"--mode png {dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

"""CAM + dense CRF: a refinement of the CAMs without a trained model (the plug-in example of the README).

    python refine_crf.py --experiment_name <cam experiment> --domain train_aug

reads ``experiments/predictions/<cam experiment>/<id>.npz`` (``keys``, ``hr_cam``; a path anywhere works
too, one without ``run.json`` with ``--external``), puts a background score ``(1 - max_c cam)^bg_power``
in front of the class scores, normalises them per pixel and refines them with the dense CRF on the photo
(``tools.scoring.refinement``), and writes the CRF's marginals through the refined-map contract
(``save_walk``: ``rw (n, H, W)``, ``rw_bg (H, W)``) to
``experiments/predictions/<cam experiment>@crf_refine=bg4_t10/<id>.npz``, which ``make_pseudo_labels.py``,
``evaluate.py`` and the report read as they read a random walk.

Defaults: ``--bg_power 4`` is PSA's ``low_alpha`` (its ``infer_cls.py`` CRF of the CAMs; IRN-era codebases
copy it): ``(1 - c)^4 = c`` at c = 0.28, about the 0.25 background threshold of the pseudo labels, where
PSA's ``high_alpha`` 32 would cross at 0.09. The CRF runs 10 iterations with PSA's kernels (Gaussian sxy 3,
compat 3; bilateral sxy 80, srgb 13, compat 10), the original's ``tools.scoring.crf.ORIGINAL_KERNELS``.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import astuple, dataclass
from pathlib import Path

from tools.artifacts.paths import CAM_SUFFIX, crf_refinement_name
from tools.artifacts.predictions import save_walk
from tools.cli.arguments import StageArgumentParser, positive_float, positive_int
from tools.cli.exits import run_main
from tools.cli.stage_data import (add_dataset_args, add_jobs_arg, add_output_args, dataset_flags, open_stage_data,
                                  prediction_folder)
from tools.cli.stage_outputs import FolderInput, run_label_jobs
from tools.data.voc import VOCReader
from tools.scoring.crf import ORIGINAL_KERNELS, CRFKernels
from tools.scoring.labels import photo_and_cams
from tools.scoring.refinement import crf_refine

BG_POWER = 4.0  # PSA's low_alpha: background (1 - max cam)^4
CRF_ITERATIONS = 10  # PSA's crf_inference t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--experiment_name", required=True, help="CAM folder under experiments/predictions/, or a path")
    add_dataset_args(parser)
    parser.add_argument("--bg_power", type=positive_float, default=BG_POWER,
                        help="background score (1 - max_c cam)^POWER (PSA's low alpha)")
    parser.add_argument("--crf_iterations", type=positive_int, default=CRF_ITERATIONS, help="mean-field iterations")
    kernels = parser.add_argument_group("CRF kernels (default: PSA's, the original's inference CRF)")
    for name in ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat"):
        kernels.add_argument(f"--{name}", type=positive_float, default=getattr(ORIGINAL_KERNELS, name))
    add_jobs_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def kernels_of(args: argparse.Namespace) -> CRFKernels:
    return CRFKernels(args.gaussian_sxy, args.gaussian_compat, args.bilateral_sxy, args.bilateral_srgb,
                      args.bilateral_compat)


def output_name(cam_experiment: str, args: argparse.Namespace) -> str:
    """``<cam experiment>@crf_refine=bg<power>_t<iterations>``, plus ``_k=<the five kernel values>`` when
    they are not the defaults."""
    settings = f"bg{args.bg_power:g}_t{args.crf_iterations}"
    kernels = kernels_of(args)
    if kernels != ORIGINAL_KERNELS:
        settings += "_k=" + ",".join(f"{value:g}" for value in astuple(kernels))
    return crf_refinement_name(cam_experiment, settings)


@dataclass(frozen=True)
class Job:
    reader: VOCReader
    cam_dir: Path
    out_dir: Path
    bg_power: float
    iterations: int
    kernels: CRFKernels
    allow_pickle: bool
    num_classes: int


def make_one(job: Job, image_id: str) -> None:
    image, cams = photo_and_cams(job.reader, job.cam_dir, image_id, job.num_classes, job.allow_pickle)
    refined = crf_refine(image, cams["hr_cam"], job.bg_power, job.iterations, job.kernels)
    save_walk(job.out_dir / f"{image_id}{CAM_SUFFIX}", cams["keys"], refined.scores, refined.background)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    data = open_stage_data(args)
    cam_dir = prediction_folder(data.paths, args.experiment_name)
    command = f"python inference_semformer.py --domain {args.domain} {dataset_flags(args)} ..."
    name = output_name(cam_dir.name, args)
    job = Job(data.reader, cam_dir, data.paths.predictions(name), args.bg_power, args.crf_iterations,
              kernels_of(args), args.allow_pickle, data.descriptor.num_classes)
    folder = run_label_jobs(args, data, Path(__file__).name, {"cams": FolderInput(cam_dir, CAM_SUFFIX, command)},
                            name, functools.partial(make_one, job), "CRF refinement", CAM_SUFFIX)
    print(f"Next: python make_pseudo_labels.py --experiment_name {name} --domain {args.domain} {dataset_flags(args)}")
    return folder


if __name__ == "__main__":
    run_main(main)

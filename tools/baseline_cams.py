"""Write baseline CAMs that use only the image-level labels, in the CAM artifact format.

A reference point for the demo and the evaluation: how well does a CAM that knows which classes
are present, but not where, score? ``centre`` puts a centred Gaussian on every present class
(objects tend to be photographed in the middle), ``uniform`` activates every present class everywhere.

    python -m tools.baseline_cams --dataset data/voc12/dataset.json --domain train \
        --kind centre --experiment_name Baseline@centre

writes ``<experiments_dir>/predictions/<experiment_name>/<id>.npz`` with ``keys`` int64 ``(n+1,)``
= ``[0, c1, ...]`` (class indices of the descriptor, background 0), ``cam`` float32
``(n, ceil(H/4), ceil(W/4))`` and ``hr_cam`` float32 ``(n, H, W)``, both max-normalised per class.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.conventions import strided_size
from tools.artifacts.files import save_npz
from tools.artifacts.paths import CAM_SUFFIX
from tools.artifacts.provenance import claim_output_folder, run_record
from tools.cli.arguments import StageArgumentParser
from tools.cli.exits import run_main
from tools.cli.measurements import measured_images
from tools.cli.stage_data import add_dataset_args, open_stage_data

KINDS = ("centre", "uniform")
CENTRE_SIGMA_FRACTION = 0.25  # Gaussian sigma per axis as a fraction of the image's height / width
NORMALISE_EPSILON = 1e-5  # as in CAM inference: divide by the spatial max + 1e-5


def baseline_map(kind: str, height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """A ``grid``-sized float32 map of a ``height x width`` image, sampled at cell centres."""
    if kind == "uniform":
        return np.ones(grid, dtype=np.float32)
    if kind != "centre":
        raise ValueError(f"unknown baseline kind '{kind}'; choose one of {KINDS}")
    rows = (np.arange(grid[0]) + 0.5) * (height / grid[0])
    columns = (np.arange(grid[1]) + 0.5) * (width / grid[1])
    dy = (rows - height / 2) / (CENTRE_SIGMA_FRACTION * height)
    dx = (columns - width / 2) / (CENTRE_SIGMA_FRACTION * width)
    return np.exp(-0.5 * (dy[:, None] ** 2 + dx[None, :] ** 2)).astype(np.float32)


def baseline_cams(kind: str, label: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """``keys``, ``cam`` and ``hr_cam`` of one image from its multi-hot ``label (num_foreground,)``."""
    keys = np.flatnonzero(label).astype(np.int64)
    arrays = {"keys": np.concatenate([[0], keys + 1]).astype(np.int64)}
    for name, grid in (("cam", strided_size(height, width)), ("hr_cam", (height, width))):
        plane = baseline_map(kind, height, width, grid)
        plane = plane / (plane.max() + NORMALISE_EPSILON)
        arrays[name] = np.repeat(plane[None], len(keys), axis=0).astype(np.float32)
    return arrays


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    add_dataset_args(parser)
    parser.add_argument("--kind", choices=KINDS, default="centre",
                        help="centre: a centred Gaussian per present class; uniform: 1 everywhere")
    parser.add_argument("--experiment_name", required=True, help="folder under experiments/predictions/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Write one ``<id>.npz`` per id of the domain; returns the output folder."""
    args = parse_args(argv)
    data = open_stage_data(args, labels=True)
    output_dir = data.paths.predictions(args.experiment_name)
    claim_output_folder(output_dir, run_record("tools/baseline_cams.py", args), CAM_SUFFIX, overwrite=True)
    for image_id in measured_images(tqdm(data.ids, desc=f"baseline CAMs ({args.kind})")):
        height, width = data.reader.image_size(image_id)
        arrays = baseline_cams(args.kind, data.reader.load_label(image_id), height, width)
        save_npz(output_dir / f"{image_id}{CAM_SUFFIX}", **arrays)
    print(f"wrote {len(data.ids)} baseline CAMs to {output_dir}")
    return output_dir


if __name__ == "__main__":
    run_main(main)

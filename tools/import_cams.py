"""Import CAMs made by another codebase as this project's CAM artifact, checked file by file.

    python -m tools.import_cams SRC DEST --format irn --allow_pickle --dataset data/voc12/dataset.json --domain train_aug

reads the peer's folder SRC (one file per image id; the formats and the code each follows:
``tools.artifacts.cam_formats``) and writes DEST (any path) as ``inference_semformer.py`` would: ``<id>.npz``
with ``keys`` int64 ``(n+1,)`` = background 0 then the image's class ids (ascending), ``cam``
float32 ``(n, ceil(H/4), ceil(W/4))`` and ``hr_cam`` float32 ``(n, H, W)``, and a ``run.json``. The
later stages read ``<experiments_dir>/predictions/<name>``: import to that folder to run them.

Every id of the list must have its file, whose maps must be finite, non-negative, of the photo's
size (or its stride-4 grid), with exactly one map per image-level label of the dataset: a class that
is not a label of the image is an error, and so is a label without a map (the peers write one map
per image-level label, so a missing one means they read other labels: another dataset, list or
class order). The maps are put in ascending class order. A format without stride-4 maps gets
``cam`` by bilinear resizing of the full-size maps (``align_corners=False``, as ``core/cam.py``
resizes); one without full-size maps gets ``hr_cam`` as IRN's ``step/make_sem_seg_labels.py``
upsamples its stride-4 maps: bilinear x4 (``align_corners=False``), cropped to the photo. Each class
map is then divided exactly by its maximum (all-zero maps stay zero), not by max + 1e-5 as
``core/cam.py``: the peers' maps are already scaled (by max + 1e-5, or min-max for CLIP-ES), the
epsilon there only guards all-zero maps, and an exact division makes a re-import change nothing.

``run.json`` names SRC (``inputs.source.path``) and ``settings.format``; its ``provenance`` hashes
the format and ``tools.artifacts.fingerprint.folder_fingerprint`` of SRC (names, sizes and SHA-256 of its
files), so a re-import of changed source files gets a new provenance and the stages built on DEST
refuse their old outputs. A DEST imported from the same files with the same format is left as it is;
any other existing DEST is refused unless ``--overwrite``. The files are converted into a hidden
sibling folder that is renamed to DEST at the end, so a failed or killed import leaves no DEST.
Pickled formats are read only with ``--allow_pickle``: unpickling a file can run code in it.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.conventions import CAM_STRIDE, strided_size
from tools.artifacts.cam_formats import FORMATS, CamFormat, ImageFacts, PeerCams
from tools.artifacts.files import ArtifactError
from tools.artifacts.fingerprint import folder_fingerprint
from tools.artifacts.paths import CAM_SUFFIX
from tools.artifacts.predictions import save_cams
from tools.artifacts.provenance import claim_output_folder, read_run, run_record
from tools.cli.arguments import StageArgumentParser, UsageError
from tools.cli.exits import run_main
from tools.cli.stage_data import (StageData, add_dataset_args, add_jobs_arg, dataset_flags, evaluation_domain,
                                  open_stage_data)
from tools.data.voc import VOCReader
from tools.scoring.parallel import parallel_map

LOG = logging.getLogger(__name__)

SCRIPT = "tools/import_cams.py"
PATH_ARGUMENTS = ("src", "dest")  # recorded as the source input; not settings of the content


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("src", help="the peer's CAM folder (one file per image id)")
    parser.add_argument("dest", help="the folder to write (our CAM artifact); must not exist unless --overwrite")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="the peer's layout (tools/cam_formats.py says which code each follows)")
    add_dataset_args(parser)
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read pickled .npy dicts (semformer, puzzlecam, irn, clip-es): only files you trust")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    add_jobs_arg(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- one file
@dataclass(frozen=True)
class ImportJob:
    """What converting one id needs (picklable, for worker processes)."""

    peer_format: CamFormat
    reader: VOCReader
    class_names: tuple[str, ...]
    output: Path


def convert_one(job: ImportJob, item: tuple[str, Path]) -> None:
    """Read, check and convert the peer file of one id into ``<output>/<id>.npz``."""
    image_id, path = item
    labels = np.flatnonzero(job.reader.load_label(image_id)).astype(np.int64) + 1
    image = ImageFacts(labels, job.reader.image_size(image_id), len(job.class_names))
    keys, cam, hr_cam = imported_cams(job.peer_format.read(path, image), path, image, job.class_names)
    save_cams(job.output / f"{image_id}{CAM_SUFFIX}", keys, cam, hr_cam)


def imported_cams(peer: PeerCams, path: Path, image: ImageFacts,
                  class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``keys (n+1,)``, ``cam (n, ceil(H/4), ceil(W/4))`` and ``hr_cam (n, H, W)`` of a checked peer file:
    its maps in ascending class order, the missing resolution derived, each map scaled to max 1."""
    order = checked_class_order(peer.classes, image.labels, path, class_names)
    expected = {"cam": strided_size(*image.size), "hr_cam": tuple(image.size)}
    maps = {resolution: checked_maps(values, name, path, len(order), expected[resolution])[order]
            for resolution, (name, values) in peer.maps.items()}
    if "cam" not in maps:
        maps["cam"] = bilinear(maps["hr_cam"], expected["cam"])
    if "hr_cam" not in maps:  # IRN's step/make_sem_seg_labels.py: x4, then cropped to the photo
        height, width = maps["cam"].shape[1:]
        maps["hr_cam"] = bilinear(maps["cam"], (height * CAM_STRIDE, width * CAM_STRIDE))[:, :image.size[0],
                                                                                          :image.size[1]]
    keys = np.concatenate([[0], image.labels]).astype(np.int64)
    return keys, scaled_to_max_one(maps["cam"]), scaled_to_max_one(maps["hr_cam"])


def checked_class_order(classes: np.ndarray, labels: np.ndarray, path: Path,
                        class_names: tuple[str, ...]) -> np.ndarray:
    """The channel order that sorts ``classes`` ``(n,)``; they must be the image's ``labels``, once each."""
    num_classes = len(class_names)
    if classes.size and (classes.min() < 1 or classes.max() >= num_classes):
        raise ArtifactError(f"{path}: class ids {classes.tolist()} outside 1..{num_classes - 1} (the dataset has "
                            f"{num_classes - 1} classes); check --format and --dataset")
    if len(np.unique(classes)) != len(classes):
        raise ArtifactError(f"{path}: class ids {classes.tolist()} repeat a class")
    label_names = [class_names[label] for label in labels]
    extra = [class_names[c] for c in classes if c not in labels]
    if extra:
        raise ArtifactError(f"{path}: maps of {extra}, not among the image's labels {label_names}")
    missing = [class_names[label] for label in labels if label not in classes]
    if missing:
        raise ArtifactError(f"{path}: no map of the image's labels {missing} (it has {label_names}); the peer "
                            "read other labels: check --dataset and the class order")
    return np.argsort(classes, kind="stable")


def checked_maps(values: np.ndarray, name: str, path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """``values`` as float32 ``(channels, *size)`` if they are finite, non-negative scores of that shape."""
    values = np.asarray(values)
    if values.ndim != 3 or len(values) != channels:
        raise ArtifactError(f"{path}: '{name}' {values.shape} must be (n, h, w) with n = {channels}, one map per class")
    if tuple(values.shape[1:]) != tuple(size):
        raise ArtifactError(f"{path}: '{name}' is {values.shape[1]}x{values.shape[2]} but must be {size[0]}x{size[1]} "
                            "for its photo")
    if not np.issubdtype(values.dtype, np.floating):
        raise ArtifactError(f"{path}: '{name}' must hold floating-point scores, got {values.dtype}")
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ArtifactError(f"{path}: '{name}' has {bad} non-finite values (NaN or inf)")
    negative = int(np.count_nonzero(values < 0))
    if negative:
        raise ArtifactError(f"{path}: '{name}' has {negative} negative scores; CAMs are non-negative (ReLU them)")
    return values.astype(np.float32)


def bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``maps (n, h, w)`` resized to ``(n, *size)``, bilinear with ``align_corners=False`` (as torch does)."""
    if len(maps) == 0:
        return np.zeros((0, *size), dtype=np.float32)
    resized = F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False)
    return resized[0].numpy()


def scaled_to_max_one(maps: np.ndarray) -> np.ndarray:
    """Each map of ``(n, h, w)`` divided by its maximum; all-zero maps stay zero."""
    peaks = maps.max(axis=(1, 2), keepdims=True)
    return np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)


# ----------------------------------------------------------------------------- the folder
def source_files(source: Path, ids: list[str], peer_format: CamFormat) -> list[tuple[str, Path]]:
    """``(id, file)`` of every id; an id without its file (or with two) is an error naming it."""
    found, missing = [], []
    for image_id in ids:
        candidates = [source / f"{image_id}{suffix}" for suffix in peer_format.suffixes]
        present = [path for path in candidates if path.is_file()]
        if len(present) > 1:
            raise ArtifactError(f"{present[0]}: id '{image_id}' has {len(present)} files ({present[1].name} too); "
                                "keep one")
        if present:
            found.append((image_id, present[0]))
        else:
            missing.append(candidates[0])
    if missing:
        raise ArtifactError(f"{missing[0]}: missing ({len(missing)} of the {len(ids)} ids of the list have no file "
                            f"in {source})")
    return found


def up_to_date(dest: Path, record: dict, overwrite: bool) -> bool:
    """Whether DEST already holds this import; an existing DEST made otherwise needs ``overwrite``."""
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise ArtifactError(f"{dest}: exists and is not a folder")
    old = read_run(dest)
    if old is not None and old.get("provenance") == record["provenance"] and not overwrite:
        return True
    if not overwrite:
        old_source = (old or {}).get("inputs", {}).get("source", {})
        reason = ("was imported from other source files or with another format" if old_source
                  else "exists and was not made by this import")
        raise ArtifactError(f"{dest}: {reason}; pass --overwrite to replace it, or import to another folder")
    return False


def replace_folder(new: Path, dest: Path) -> None:
    """Rename the finished folder ``new`` to ``dest``, moving an old ``dest`` aside and deleting it."""
    if not dest.exists():
        os.rename(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, old / dest.name)
    os.rename(new, dest)
    shutil.rmtree(old)


def main(argv: list[str] | None = None) -> Path:
    """Import SRC into DEST; returns DEST."""
    args = parse_args(argv)
    source, dest = Path(args.src), Path(args.dest)
    peer_format = FORMATS[args.format]
    if peer_format.pickled and not args.allow_pickle:
        raise ArtifactError(f"{source}: --format {args.format} files are pickled dicts, and unpickling can run code "
                            "in them; pass --allow_pickle to read them (only files you trust)")
    if not source.is_dir():
        raise ArtifactError(f"{source}: source folder not found")
    if source.resolve().is_relative_to(dest.resolve()):  # replacing DEST would delete the source
        raise UsageError(f"DEST {dest} is SRC or holds it: import into another folder")
    data = open_stage_data(args)
    files = source_files(source, data.ids, peer_format)
    LOG.info(f"fingerprinting the {'/'.join(peer_format.suffixes)} files of {source}")
    inputs = {"source": {"path": str(source.resolve()), "provenance": folder_fingerprint(source, peer_format.suffixes)}}
    settings = {name: value for name, value in vars(args).items() if name not in PATH_ARGUMENTS}
    record = run_record(SCRIPT, settings, inputs)
    if up_to_date(dest, record, args.overwrite):
        print(f"{dest} is up to date: imported from the same source files with --format {args.format}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.importing"
    staging.mkdir()  # with the usual mode (mkdtemp would make it private)
    try:
        claim_output_folder(staging, record, CAM_SUFFIX, overwrite=False)
        job = ImportJob(peer_format, data.reader, data.descriptor.class_names, staging)
        for _ in parallel_map(functools.partial(convert_one, job), files, args.n_jobs, f"{args.format} CAMs"):
            pass
        replace_folder(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"imported {len(files)} CAM files from {source} into {dest}")
    print_next(args, data, dest)
    return dest


def print_next(args: argparse.Namespace, data: StageData, dest: Path) -> None:
    """The next stages' commands, if DEST is where they look (``<experiments_dir>/predictions/<name>``)."""
    predictions = data.paths.predictions(dest.name)
    if predictions.resolve() != dest.resolve():
        print(f"The stages read {predictions.parent}/<name>: import there (or pass --experiments_dir) to run them")
        return
    print(f"Next: python evaluate.py --experiment_name {dest.name} --domain {evaluation_domain(data.descriptor, args)} "
          f"{dataset_flags(args)}\n"
          f"      python make_affinity_labels.py --experiment_name {dest.name} --domain {args.domain} "
          f"{dataset_flags(args)}")


if __name__ == "__main__":
    run_main(main)

"""The data flags every stage shares (dataset, list, experiment folders, output policy) and what they open."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from tools.artifacts.paths import ExperimentPaths
from tools.cli.arguments import UsageError, positive_int
from tools.data.descriptor import DEFAULT_DESCRIPTOR, DatasetDescriptor, load_descriptor, read_id_list
from tools.data.readers import make_reader
from tools.data.voc import VOCReader
from tools.scoring.parallel import default_jobs


def add_dataset_args(parser: argparse.ArgumentParser, domain: str = "train") -> None:
    """``--dataset`` (descriptor JSON), ``--data_dir``, ``--domain``, ``--list``, ``--experiments_dir``."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", default=str(DEFAULT_DESCRIPTOR),
                       help="dataset descriptor JSON (class names, palette, list files)")
    group.add_argument("--data_dir", default=None,
                       help="dataset root with JPEGImages/, Annotations/, SegmentationClass/ "
                            "(default: the descriptor's data_dir)")
    group.add_argument("--domain", default=domain, help="list of the descriptor: train, train_aug, val, ...")
    group.add_argument("--list", default=None, help="a list file of ids to use instead of the domain's")
    group.add_argument("--experiments_dir", default="experiments",
                       help="root of models/, logs/, tensorboards/, predictions/")


def add_output_args(parser: argparse.ArgumentParser, reads_predictions: bool = True) -> None:
    """``--overwrite`` (finished files are skipped otherwise) and, for a stage that reads prediction folders,
    ``--allow_pickle`` (legacy ``.npy`` inputs) and ``--external`` (input folders without ``run.json``)."""
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    if reads_predictions:
        parser.add_argument("--allow_pickle", action="store_true",
                            help="read the original repository's pickled .npy files (only files you trust)")
        parser.add_argument("--external", action="store_true",
                            help="accept an input folder in our layout without run.json (made by hand or by another "
                                 "codebase): recorded by a fingerprint of its .npz/.npy files, so a changed file "
                                 "makes this stage's output stale")


def add_jobs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n_jobs", type=positive_int, default=default_jobs(),
                        help="worker processes (default: all cores)")


@dataclass(frozen=True)
class StageData:
    """What a stage script needs to know about its data."""

    descriptor: DatasetDescriptor
    reader: VOCReader
    ids: list[str]
    paths: ExperimentPaths


def open_stage_data(args: argparse.Namespace, labels: bool = False) -> StageData:
    """Descriptor, reader and id list from the ``add_dataset_args`` flags. Every id's photo (and, for a
    stage that reads image-level ``labels``, its annotation where the layout has one) is checked before any
    work starts, naming the first missing one: a ``stat`` per file, about 0.2 s for VOC's 10,582 ids on a
    local disk."""
    descriptor = load_descriptor(args.dataset)
    reader = make_reader(descriptor, args.data_dir)
    ids = read_id_list(args.list) if args.list else descriptor.read_ids(args.domain)
    reader.validate(ids, labels)
    return StageData(descriptor, reader, ids, ExperimentPaths(Path(args.experiments_dir)))


def prediction_folder(paths: ExperimentPaths, name_or_path: str) -> Path:
    """The folder a ``--experiment_name`` / ``--cam_dir`` value names: a path as given when it contains a ``/``
    or is an existing directory, else ``<experiments_dir>/predictions/<name>``. Outputs derived from it are
    named after its last component (``Path.name``)."""
    if "/" in name_or_path or Path(name_or_path).is_dir():
        return Path(name_or_path)
    return paths.predictions(name_or_path)


def shard(ids: list[str], start: float, end: float) -> list[str]:
    """The ``[start, end)`` fraction of an id list, as the original's ``--start/--end``."""
    if not 0.0 <= start < end <= 1.0:
        raise UsageError(f"--start/--end must satisfy 0 <= start < end <= 1, got {start}, {end}")
    return ids[int(len(ids) * start): int(len(ids) * end)]


def dataset_flags(args: argparse.Namespace, with_list: bool = True) -> str:
    """The dataset flags to repeat in a printed next-stage command; without ``--list`` for a next stage
    that works on another list (DeepLab training's maps are made for val, not for the training list)."""
    flags = f"--dataset {args.dataset}"
    if args.data_dir:
        flags += f" --data_dir {args.data_dir}"
    if args.list and with_list:
        flags += f" --list {args.list}"
    if args.experiments_dir != "experiments":
        flags += f" --experiments_dir {args.experiments_dir}"
    return flags



def evaluation_domain(descriptor: DatasetDescriptor, args: argparse.Namespace) -> str:
    """The domain a printed ``evaluate.py`` command should score: ``train`` for ``train_aug``, whose
    extra SBD images have no mask in VOC's ``SegmentationClass``."""
    if args.domain == "train_aug" and "train" in descriptor.lists and not args.list:
        return "train"
    return args.domain



def process_rank() -> int:
    """This process's ``torchrun`` rank (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def rank_shard(ids: list[str]) -> list[str]:
    """This process's share of an id list under ``torchrun`` (every WORLD_SIZE-th id), else all ids.

    Inference needs no process group: each rank writes its own files.
    """
    return ids[process_rank()::int(os.environ.get("WORLD_SIZE", 1))]

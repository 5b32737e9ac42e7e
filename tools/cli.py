"""Command-line pieces every stage script shares: dataset selection, experiment folders and exit statuses.

Exit statuses of every script (``run_main``):

- 0: done;
- 1 (``EXIT_ERROR``): bad input, a one-line ``error: <file or flag>: <problem>`` on stderr;
- 2 (``EXIT_USAGE``): bad flags (argparse's usage error, or flags that do not fit together);
- 3 (``EXIT_INTERRUPTED``): a training run stopped by SIGINT/SIGTERM after saving its checkpoint:
  the same command plus ``--resume`` continues it;
- 130 (``EXIT_ABORTED``): stopped at once by a second Ctrl-C / SIGTERM (the step in progress is lost;
  finished files and the last checkpoint are intact).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.errors import CheckpointError
from tools.arguments import UsageError, positive_int
from tools.artifacts import (CAM_SUFFIX, PNG_SUFFIX, ArtifactError, ExperimentPaths, pending_ids,
                             require_complete)
from tools.descriptor import DEFAULT_DESCRIPTOR, DatasetDescriptor, DatasetError, load_descriptor, read_id_list
from tools.parallel import default_jobs, parallel_map
from tools.provenance import claim_output_folder, folder_input, run_record
from tools.reader import VOCReader, make_reader

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
EXIT_ABORTED = 130
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class TrainingInterrupted(Exception):
    """A training run stopped by a signal after saving its checkpoint (exit status ``EXIT_INTERRUPTED``)."""


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
    """``--overwrite`` (finished files are skipped otherwise) and ``--allow_pickle`` (legacy ``.npy`` inputs)."""
    parser.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    if reads_predictions:
        parser.add_argument("--allow_pickle", action="store_true",
                            help="read the original repository's pickled .npy files (only files you trust)")


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


def open_stage_data(args: argparse.Namespace) -> StageData:
    """Descriptor, reader and id list from the ``add_dataset_args`` flags."""
    descriptor = load_descriptor(args.dataset)
    reader = make_reader(descriptor, args.data_dir)
    ids = read_id_list(args.list) if args.list else descriptor.read_ids(args.domain)
    return StageData(descriptor, reader, ids, ExperimentPaths(Path(args.experiments_dir)))


def shard(ids: list[str], start: float, end: float) -> list[str]:
    """The ``[start, end)`` fraction of an id list, as the original's ``--start/--end``."""
    if not 0.0 <= start < end <= 1.0:
        raise UsageError(f"--start/--end must satisfy 0 <= start < end <= 1, got {start}, {end}")
    return ids[int(len(ids) * start): int(len(ids) * end)]


def dataset_flags(args: argparse.Namespace) -> str:
    """The dataset flags to repeat in a printed next-stage command."""
    flags = f"--dataset {args.dataset}"
    if args.data_dir:
        flags += f" --data_dir {args.data_dir}"
    if args.list:
        flags += f" --list {args.list}"
    if args.experiments_dir != "experiments":
        flags += f" --experiments_dir {args.experiments_dir}"
    return flags


def finish_training(result: object, tag: str, is_main: bool, next_command: str) -> None:
    """End of a training script: print the next stage's command, or raise ``TrainingInterrupted``
    (exit status 3) if a signal stopped the run, so a driver can tell it from a finished one."""
    if getattr(result, "interrupted"):
        raise TrainingInterrupted(f"training of {tag} stopped at iteration {getattr(result, 'global_step')} "
                                  "with its checkpoint saved; continue with the same command plus --resume")
    if is_main:
        print(f"Next: {next_command}")


def error_message(error: BaseException) -> str:
    """The message of an error; for one re-raised from a DataLoader worker, the worker's own message
    (torch puts the worker's traceback in front of it)."""
    text = str(error)
    if WORKER_TRACEBACK not in text:
        return text
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    return text[text.rindex(marker) + len(marker):].strip() if marker in text else text.strip().splitlines()[-1]


def evaluation_domain(descriptor: DatasetDescriptor, args: argparse.Namespace) -> str:
    """The domain a printed ``evaluate.py`` command should score: ``train`` for ``train_aug``, whose
    extra SBD images have no mask in VOC's ``SegmentationClass``."""
    if args.domain == "train_aug" and "train" in descriptor.lists and not args.list:
        return "train"
    return args.domain


ABORT_MESSAGE = ("aborted: stopped at once by a second interrupt; finished files and the last checkpoint are "
                 "intact, rerun the same command (plus --resume for training) to continue")


def _ignore_interrupts() -> None:
    """For the exit itself: a late Ctrl-C would otherwise kill the exiting process with a signal status
    instead of the status the script chose (its DataLoader workers are killed at exit, so it cannot hang)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def _outcome(error: BaseException) -> tuple[int, str] | None:
    """Exit status and message of an exception that ends a script, None for one that is a bug."""
    if isinstance(error, (DatasetError, ArtifactError, CheckpointError)):
        return EXIT_ERROR, f"error: {error_message(error)}"
    if isinstance(error, UsageError):
        return EXIT_USAGE, f"error: {error}"
    if isinstance(error, TrainingInterrupted):
        return EXIT_INTERRUPTED, f"interrupted: {error}"
    if isinstance(error, KeyboardInterrupt):
        return EXIT_ABORTED, ABORT_MESSAGE
    return None


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main`` and exit with the statuses of the module docstring: bad input (a named
    file or argument) and interruptions end with one line on stderr, never a traceback. Once ``main``
    has ended, a further Ctrl-C / SIGTERM no longer changes how it ends. The library's ``logging``
    messages (progress notes, what a stage skipped or replaced) are printed to stdout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        main()
    except BaseException as error:
        _ignore_interrupts()
        outcome = _outcome(error)
        if outcome is None:
            raise
        status, message = outcome
        print(f"\n{message}" if status == EXIT_ABORTED else message, file=sys.stderr)
        sys.exit(status)
    _ignore_interrupts()


def run_label_jobs(args: argparse.Namespace, data: StageData, script: str, inputs: dict[str, Path], command: str,
                   output: Path, make_one: Callable[[str], None], what: str) -> None:
    """The CAM-to-label stages' loop: the input folders complete (else ``command`` makes them) and
    recorded with their provenance, the output folder claimed for these settings, and
    ``make_one(image_id)`` for every label still missing, on ``--n_jobs`` processes."""
    for folder in inputs.values():
        require_complete(folder, data.ids, CAM_SUFFIX, command)
    recorded = {name: folder_input(folder, command, args.allow_pickle) for name, folder in inputs.items()}
    claim_output_folder(output, run_record(script, args, recorded), PNG_SUFFIX, args.overwrite)
    todo = pending_ids(output, data.ids, PNG_SUFFIX, args.overwrite, what)
    for _ in parallel_map(make_one, todo, args.n_jobs, what):
        pass


def process_rank() -> int:
    """This process's ``torchrun`` rank (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def rank_shard(ids: list[str]) -> list[str]:
    """This process's share of an id list under ``torchrun`` (every WORLD_SIZE-th id), else all ids.

    Inference needs no process group: each rank writes its own files.
    """
    return ids[process_rank()::int(os.environ.get("WORLD_SIZE", 1))]

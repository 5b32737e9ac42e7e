"""``run_pipeline.py --preflight``: every stage of a recipe at full size on a few images, timed, before a long run.

Each stage runs as the pipeline runs it (the same script and flags, plus the overrides) at its full model,
image and batch sizes, but on a scratch dataset (``tools.data.scratch``: every list cut to its first N ids)
and into a scratch experiments folder, removed at the end (also after a failure or a Ctrl-C). A training stage
gets ``--max_steps`` (one warm-up step plus the timed ones, as one epoch with its evaluation and model save, its
training set repeated to fill whole batches), so the next stage reads its model; a scored stage's
``evaluate.py`` pass runs too. Every process reports its measurements (``tools.cli.measurements``): seconds per
step or per image after the warm-up, evaluation and save seconds, peak memory. Start-up is the rest of the
stage's wall time (imports, model building, the warm-up step or image, the exit) and counts once per stage in
the projection of the full run on this machine: the recipe's steps, epochs and evaluations on the full lists
(``tools.preflight.projection``). The first failing stage stops the preflight, which exits non-zero naming it.
Logs and the table stay in ``<experiments>/logs/preflight@<recipe>/`` and ``preflight@<recipe>.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tools.artifacts.files import atomic_write_text
from tools.cli.exits import EXIT_ABORTED, EXIT_INTERRUPTED, CommandFailed
from tools.cli.measurements import MEASUREMENTS_VARIABLE, read_measurements
from tools.cli.signals import handled
from tools.cli.stage_process import failure_line, run_stage
from tools.data.descriptor import DatasetDescriptor, load_descriptor
from tools.data.scratch import write_scratch_dataset
from tools.pipeline import (Overrides, Settings, Stage, command, ensure_dataset, evaluation_command, load_recipe,
                            parsed_args, printable, recipe_path, recipe_stages, torchrun_processes)
from tools.preflight.projection import (SCORING, Outcome, Row, describe, failed_row, image_row, print_table,
                                        skipped_row, training_row)

LOG = logging.getLogger(__name__)

DEFAULT_IMAGES = 8
DEFAULT_STEPS = 3
WARMUP_STEPS = 1  # the first optimiser step (worker start-up, allocator growth, autotuning) is not timed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class PreflightStopped(Exception):
    """A signal stopped the preflight (its scratch folder is removed on the way out)."""


@contextmanager
def signals_stop_preflight() -> Iterator[None]:
    """SIGTERM / SIGHUP between stages end the preflight as a Ctrl-C does, so its scratch folder is removed (while
    a stage runs, ``tools.cli.stage_process`` forwards them to the stage, which then stops)."""
    def stop(number: int, frame: object) -> None:
        raise PreflightStopped(signal.Signals(number).name)

    with handled(STOP_SIGNALS, stop):
        yield


def written_bytes(root: Path, before: dict[Path, int]) -> tuple[dict[Path, int], int]:
    """The sizes of the files under ``root`` now, and the bytes of those new or changed since ``before``."""
    now = {path: path.stat().st_size for path in root.rglob("*") if path.is_file()}
    return now, sum(size for path, size in now.items() if before.get(path) != size)


class Preflight:
    """One preflight: the dataset whose lists the full run reads (for their sizes: the run's own, or
    ``project_lists``), the scratch one the stages read, and the rows measured so far."""

    def __init__(self, settings: Settings, scratch: Path, images: int, steps: int, logs: Path,
                 project_lists: str | None = None) -> None:
        self.settings, self.logs, self.steps = settings, logs, steps
        source = load_descriptor(settings.dataset)
        self.real: DatasetDescriptor = load_descriptor(project_lists) if project_lists else source
        dataset = write_scratch_dataset(source, settings.data_dir, scratch / "data", images)
        self.scratch: DatasetDescriptor = load_descriptor(dataset)
        self.here = replace(settings, dataset=str(dataset), experiments_dir=str(scratch / "experiments"))
        self.measurements = scratch / "measurements"
        self.files: dict[Path, int] = {}
        self.rows: list[Row] = []

    def run(self, stage: Stage, argv: list[str], label: str) -> Outcome | str:
        """Run one process of the stage: ``(wall seconds, each rank's measurements, bytes written)``, or the
        one-line failure."""
        folder = self.measurements / f"{stage.name}.{label}"
        folder.mkdir(parents=True)
        LOG.info(f"+ {printable(argv, self.settings.python)}")
        log = self.logs / f"{stage.name}.log"
        started = time.monotonic()
        code = run_stage(argv, log, label, {MEASUREMENTS_VARIABLE: str(folder)})
        wall = time.monotonic() - started
        if code in (EXIT_INTERRUPTED, EXIT_ABORTED):
            raise PreflightStopped(f"{stage.name} stopped by a signal")
        if code != 0:
            return f"{failure_line(log)} (exit status {code}; log {log})"
        self.files, written = written_bytes(Path(self.here.experiments_dir), self.files)
        ranks = read_measurements(folder)
        if not ranks:
            return f"no measurements reported (a script that does not end through tools.cli.exits.run_main); log {log}"
        return wall, ranks, written

    def measure(self, stage: Stage) -> Row:
        """Run and measure the stage's own process; its row."""
        args = parsed_args(stage, self.settings)  # the full run's settings
        if "model" in stage.output:
            extra = ["--max_steps", str(WARMUP_STEPS + self.steps)] if hasattr(args, "max_steps") else []
            outcome = self.run(stage, command(stage, self.here, extra), stage.name)
            if isinstance(outcome, str):
                return failed_row(stage.name, stage.title, outcome)
            return training_row(stage.name, stage.title, args, outcome, self.here.paths.model(stage.output["model"]),
                                self.real, self.scratch, WARMUP_STEPS)
        outcome = self.run(stage, command(stage, self.here), stage.name)
        if isinstance(outcome, str):
            return failed_row(stage.name, stage.title, outcome)
        processes = max(1, torchrun_processes(stage, self.here))
        outputs = sorted(self.here.paths.predictions(stage.output["folder"]).glob(f"*{stage.output['suffix']}"))
        return image_row(stage.name, stage.title, outcome, len(self.real.read_ids(stage.output["domain"])),
                         processes, outputs)

    def score(self, stage: Stage) -> Row:
        """Run and measure the stage's ``evaluate.py`` pass; its row."""
        title = f"{stage.title}{SCORING}"
        outcome = self.run(stage, evaluation_command(stage, self.here), "evaluate")
        if isinstance(outcome, str):
            return failed_row(stage.name, title, outcome)
        return image_row(stage.name, title, outcome, len(self.real.read_ids(stage.score["domain"])), 1, [])

    def stage(self, stage: Stage) -> bool:
        """Run, measure and project one stage and its scoring pass; False when one failed."""
        LOG.info(f"=== {stage.title} ({stage.name})")
        passes = [self.measure]
        if stage.score:
            passes.append(self.score)
        for measure in passes:
            self.rows.append(measure(stage))
            LOG.info(describe(self.rows[-1]))
            if self.rows[-1].failure:
                return False
        return True


def run_preflight(name: str, settings: Settings, overrides: Overrides | None = None, images: int = DEFAULT_IMAGES,
                  steps: int = DEFAULT_STEPS, project_lists: str | None = None) -> list[Row]:
    """Preflight the recipe ``name`` with ``images`` ids per list and ``steps`` timed steps per training stage;
    prints the table and returns its rows; the first failing stage raises ``CommandFailed`` naming it.
    ``project_lists``: a descriptor whose list sizes the projection uses instead of the dataset's own (only its
    list files are read: ``data/voc12/dataset.json`` projects a synthetic set's preflight onto VOC's sizes)."""
    recipe = load_recipe(name)
    label = recipe_path(name).stem
    stages = recipe_stages(recipe, settings, overrides or Overrides())
    root = settings.paths.root
    logs = root / "logs" / f"preflight@{label}"
    shutil.rmtree(logs, ignore_errors=True)  # the previous preflight's
    ensure_dataset(recipe, settings, logs)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"preflight@{label}.", dir=root))
    LOG.info(f"preflight of {label}: {images} images per list, {WARMUP_STEPS} + {steps} steps per training stage, "
             f"scratch folder {scratch} (removed at the end)")
    try:
        with signals_stop_preflight():
            preflight = Preflight(settings, scratch, images, steps, logs, project_lists)
            failed = next((stage for stage in stages if not preflight.stage(stage)), None)
    except (KeyboardInterrupt, PreflightStopped) as error:
        raise CommandFailed(f"preflight stopped ({error or 'interrupt'}); its scratch folder {scratch} is removed",
                            status=EXIT_ABORTED) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = preflight.rows
    done = {row.name for row in rows}
    rows += [skipped_row(stage.name, stage.title) for stage in stages if stage.name not in done]
    seconds = time.monotonic() - started
    print_table(rows, seconds)
    atomic_write_text(root / "logs" / f"preflight@{label}.json",
                      json.dumps({"seconds": round(seconds, 1), "rows": [vars(row) for row in rows]}, indent=2) + "\n")
    if failed is not None:
        reason = next(row.failure for row in rows if row.failure)
        raise CommandFailed(f"preflight: stage {failed.name} ({failed.title}) failed: {reason}")
    return rows


def check_arguments(args: argparse.Namespace) -> str | None:
    """``run_pipeline.py``'s check: the preflight runs every stage, fresh, so it takes no stage range or
    ``--force``, and is not a dry run."""
    if not args.preflight:
        return None
    given = [flag for flag, value in (("--from", args.first), ("--to", args.last), ("--force", args.force),
                                      ("--dry_run", args.dry_run)) if value]
    return f"--preflight runs every stage into a scratch folder: drop {', '.join(given)}" if given else None

"""How every script ends: its exit status and one line on stderr instead of a traceback.

Exit statuses of every script (``run_main``):

- 0: done;
- 1 (``EXIT_ERROR``): bad input, a one-line ``error: <file or flag>: <problem>`` on stderr; also a write
  that failed (disk full, quota, read-only or forbidden folder), naming the file and what to do;
- 2 (``EXIT_USAGE``): bad flags (argparse's usage error, or flags that do not fit together: ``UsageError``);
- 3 (``EXIT_INTERRUPTED``): a training run stopped by SIGINT/SIGTERM after saving its checkpoint:
  the same command plus ``--resume`` continues it;
- 130 (``EXIT_ABORTED``): stopped at once by a second Ctrl-C / SIGTERM (the step in progress is lost;
  finished files and the last checkpoint are intact).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from core.errors import CheckpointError
from tools.artifacts.files import ArtifactError, write_failure_advice
from tools.cli.arguments import UsageError
from tools.cli.measurements import write_measurements
from tools.data.descriptor import DatasetError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
EXIT_ABORTED = 130
WORKER_TRACEBACK = "Original Traceback (most recent call last):"
STATUS_DIR_VARIABLE = "STAGE_STATUS_DIR"  # where run_main reports its exit status to a driver (run_pipeline.py)
STATUS_SUFFIX = ".status"


class TrainingInterrupted(Exception):
    """A training run stopped by a signal after saving its checkpoint (exit status ``EXIT_INTERRUPTED``)."""


class TrainingDiverged(Exception):
    """A training run whose loss became non-finite: stopped before the step, not marked finished (status 1)."""


class CommandFailed(Exception):
    """Work that a tool ran failed (a stage command, a benchmark row): ``error: <message>`` and ``status``."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status



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



ABORT_MESSAGE = ("aborted: stopped at once by a second interrupt; finished files and the last checkpoint are "
                 "intact, rerun the same command (plus --resume for training) to continue")


def _ignore_interrupts() -> None:
    """For the exit itself: a late Ctrl-C would otherwise kill the exiting process with a signal status
    instead of the status the script chose (its DataLoader workers are killed at exit, so it cannot hang)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def _outcome(error: BaseException) -> tuple[int, str] | None:
    """Exit status and message of an exception that ends a script, None for one that is a bug."""
    if isinstance(error, (DatasetError, ArtifactError, CheckpointError, TrainingDiverged)):
        return EXIT_ERROR, f"error: {error_message(error)}"
    advice = write_failure_advice(error) if isinstance(error, OSError) else None
    if advice is not None:  # a write outside the atomic writer (a log file), or an OSError a library re-raised
        where = f"{error.filename}: " if error.filename else ""
        return EXIT_ERROR, f"error: {where}{error.strerror or error}; {advice}"
    if isinstance(error, UsageError):
        return EXIT_USAGE, f"error: {error}"
    if isinstance(error, TrainingInterrupted):
        return EXIT_INTERRUPTED, f"interrupted: {error}"
    if isinstance(error, CommandFailed):
        return error.status, f"error: {error}"
    if isinstance(error, KeyboardInterrupt):
        return EXIT_ABORTED, ABORT_MESSAGE
    return None


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main`` and exit with the statuses of the module docstring: bad input (a named
    file or argument) and interruptions end with one line on stderr, never a traceback. Once ``main``
    has ended, a further Ctrl-C / SIGTERM no longer changes how it ends. The library's ``logging``
    messages (progress notes, what a stage skipped or replaced) are printed to stdout. A finished run writes
    its measurements when a driver asked for them (``tools.cli.measurements``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        main()
        write_measurements()
    except BaseException as error:
        _ignore_interrupts()
        outcome = _outcome(error)
        if outcome is None:
            code = error.code if isinstance(error, SystemExit) else EXIT_ERROR  # argparse's usage errors: 2
            _report_status(code if isinstance(code, int) else EXIT_ERROR if code else 0)
            raise
        status, message = outcome
        _report_status(status)
        print(f"\n{message}" if status == EXIT_ABORTED else message, file=sys.stderr)
        sys.exit(status)
    _report_status(0)
    _ignore_interrupts()


def _report_status(status: int) -> None:
    """Write this process's exit status to ``$STAGE_STATUS_DIR/rank<RANK>.status`` when a driver asks for it:
    under torchrun every failing worker becomes status 1, and the driver reads the real one here."""
    folder = os.environ.get(STATUS_DIR_VARIABLE)
    if folder:
        Path(folder, f"rank{os.environ.get('RANK', '0')}{STATUS_SUFFIX}").write_text(f"{status}\n")


def reported_statuses(folder: Path) -> list[int]:
    """The statuses the ranks of a run wrote into ``folder`` (``_report_status``)."""
    return [int(path.read_text()) for path in sorted(Path(folder).glob(f"rank*{STATUS_SUFFIX}"))]



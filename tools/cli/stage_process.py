"""A stage command run by a driver (``run_pipeline.py``, its ``--preflight``) as a child process.

The child runs from the repository root in its own session, all its output appended to the stage's log while
the latest progress bar is echoed to the terminal; SIGINT/SIGTERM/SIGHUP reach it once, through the driver,
so a training stage saves its checkpoint and exits with ``EXIT_INTERRUPTED``. Each rank reports its real
exit status through ``$STAGE_STATUS_DIR`` (under torchrun every failing worker becomes status 1).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tools.cli.exits import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, STATUS_DIR_VARIABLE, CommandFailed,
                             reported_statuses)
from tools.cli.repository import REPOSITORY
from tools.cli.signals import handled

LOG = logging.getLogger(__name__)

PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: "12/50 [00:03<00:09, ...]"
QUIET_PROGRESS_SECONDS = 30.0  # progress lines when the terminal is not interactive
FAILURE_TAIL_LINES = 30
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ERROR_PREFIX = "error: "  # the one line every script ends a failure with (tools.cli.exits.run_main)


class ProgressEcho:
    """Shows the latest progress bar of a stage on the terminal (every 30 s when not interactive)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.interactive = sys.stdout.isatty()
        self.last_print = 0.0
        self.shown = False

    def offer(self, fragment: str) -> None:
        if not PROGRESS.search(fragment):
            return
        now = time.monotonic()
        if self.interactive:
            width = shutil.get_terminal_size().columns
            sys.stdout.write("\r" + f"  {self.label}: {fragment.strip()}"[: width - 1].ljust(width - 1))
            sys.stdout.flush()
            self.shown = True
        elif now - self.last_print >= QUIET_PROGRESS_SECONDS:
            LOG.info(f"  {self.label}: {fragment.strip()}")
            self.last_print = now

    def close(self) -> None:
        if self.shown:
            sys.stdout.write("\n")
            sys.stdout.flush()


@contextmanager
def forward_signals(process: subprocess.Popen) -> Iterator[None]:
    """Pass SIGINT/SIGTERM/SIGHUP on to ``process`` (which runs in its own session, so a Ctrl-C reaches it
    once, through here): a training stage then saves its checkpoint and exits with ``EXIT_INTERRUPTED``."""
    with handled(FORWARDED_SIGNALS, lambda received, frame: process.send_signal(received)):
        yield


def run_stage(argv: list[str], log: Path, label: str, environment: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` from the repository root with ``environment`` added to this process's, all its output
    appended to ``log``, its progress echoed; returns its exit status (under torchrun, the ranks' own:
    ``EXIT_INTERRUPTED`` or ``EXIT_USAGE`` when a rank reported one)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    echo = ProgressEcho(label)
    statuses = Path(tempfile.mkdtemp(prefix=f".{label}.status.", dir=log.parent))  # each rank's own status
    variables = {**os.environ, **(environment or {}), "PYTHONUNBUFFERED": "1", STATUS_DIR_VARIABLE: str(statuses)}
    with open(log, "ab") as handle:
        handle.write(f"$ {shlex.join(argv)}\n".encode())
        process = subprocess.Popen(argv, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=variables, start_new_session=True)
        pending = b""
        assert process.stdout is not None
        with forward_signals(process):
            while chunk := process.stdout.read1(65536):
                handle.write(chunk)
                handle.flush()
                pending += chunk
                *fragments, pending = re.split(rb"[\r\n]", pending)
                for fragment in fragments[-3:]:
                    echo.offer(fragment.decode(errors="replace"))
            code = process.wait()
    echo.close()
    reported = reported_statuses(statuses)
    shutil.rmtree(statuses, ignore_errors=True)
    if code != 0:  # torchrun ends with 1 whatever its workers' statuses: theirs decide
        code = next((status for status in (EXIT_INTERRUPTED, EXIT_USAGE) if status in reported), code)
    return code


def log_lines(log: Path) -> list[str]:
    """The non-blank lines of a stage log (progress bars' carriage returns as line ends)."""
    return [line for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]


def failure_line(log: Path) -> str:
    """A failed stage's reason in one line: its last ``error: ...`` line, else its log's last line (a traceback's
    exception)."""
    lines = log_lines(log)
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    if errors:
        return errors[-1][len(ERROR_PREFIX):]
    return lines[-1].strip() if lines else "no output"


def run_logged(argv: list[str], log: Path, label: str, environment: Mapping[str, str] | None = None) -> None:
    """``run_stage``; a failure prints the log's last lines and stops the pipeline (an interrupted stage with
    exit status ``EXIT_INTERRUPTED``, which a rerun of the pipeline resumes)."""
    code = run_stage(argv, log, label, environment)
    if code == EXIT_INTERRUPTED:
        LOG.error(f"interrupted: {label} stopped after saving its checkpoint; run the same run_pipeline.py command "
                  f"again to continue (log {log})")
        raise SystemExit(EXIT_INTERRUPTED)
    if code != 0:
        tail = "\n".join(log_lines(log))[-4000:].splitlines()[-FAILURE_TAIL_LINES:]
        raise CommandFailed(f"stage command failed ({code}): {shlex.join(argv)}\n" + "\n".join(tail)
                            + f"\nfull log: {log}", status=EXIT_USAGE if code == EXIT_USAGE else EXIT_ERROR)

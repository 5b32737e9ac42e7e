"""Runs the repository's scripts in a subprocess, as a user would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLICE_SECONDS = 0.01  # how long a stepped process runs between two looks at its outputs


def run_completed(*args: str, cwd: Path = REPO, timeout: float = 600,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repository script as a user would: its exit status and its stdout and stderr apart."""
    environment = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment)


def run_script(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None) -> str:
    """Run a repository script as a user would; fail with its output if it exits non-zero."""
    result = run_completed(*args, cwd=cwd, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def run_failing(*args: str, cwd: Path = REPO, timeout: float = 600) -> str:
    """Run a script that must fail with a one-line error (no traceback); return its stderr."""
    result = run_completed(*args, cwd=cwd, timeout=timeout)
    assert result.returncode != 0, f"{' '.join(args)} succeeded:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def kill_when_files_appear(process: subprocess.Popen, folder: Path, pattern: str = "*.npz", count: int = 1,
                           timeout: float = 300) -> int:
    """SIGKILL ``process``'s group (started with ``start_new_session=True``) once ``folder`` holds ``count``
    files matching ``pattern``; return how many it holds then.

    The group runs in slices of ``SLICE_SECONDS`` and is stopped (SIGSTOP) while the folder is counted, so a
    stage that writes its files faster than a poll loop looks cannot finish between the look and the kill, on
    however fast or busy a machine."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        os.killpg(process.pid, signal.SIGSTOP)
        written = len(list(folder.glob(pattern))) if folder.is_dir() else 0
        if written >= count:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return written
        os.killpg(process.pid, signal.SIGCONT)
        time.sleep(SLICE_SECONDS)
    process.wait()
    raise AssertionError(f"{folder} never held {count} {pattern} files before the process ended "
                         f"({process.returncode}) or {timeout:.0f} s passed")

"""Runs the repository's scripts in a subprocess, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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

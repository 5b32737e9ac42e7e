"""What a stage process measured of itself, for a driver that asks (``run_pipeline.py --preflight``).

When ``$STAGE_MEASUREMENTS_DIR`` names a folder, the process keeps

- the seconds of each optimiser step, evaluation pass and epoch-end save (``tools.training.engine``,
  through ``measured``);
- the seconds of each image of an inference or label loop: between successive images of a loop in this
  process (``measured_images`` around it), or a pool worker's own seconds for it divided by the pool's
  processes (``parallel_map``); background work that ends after the loop (``BackgroundJobs`` draining its
  CRFs) is added to the last image (``work_done``),

and ``run_main`` writes them at its end to ``<folder>/rank<RANK>.json`` (``write_measurements``) with the
process's peak memory: the CUDA allocator's peak (``torch.cuda.max_memory_allocated``) where CUDA was used,
the peak resident set of this program (``VmHWM``, which unlike ``ru_maxrss`` does not count the pages of the
parent it was forked from before its exec) and that of its largest finished child process (DataLoader
workers, job pools). The first image is the warm-up (worker start-up, lazy initialisation): ``image_seconds``
is the mean of the others. Without the variable nothing is kept.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tools.artifacts.files import atomic_write_text

MEASUREMENTS_VARIABLE = "STAGE_MEASUREMENTS_DIR"
MEASUREMENTS_SUFFIX = ".json"
STEP, EVALUATION, SAVE = "step", "evaluation", "save"  # the kinds of timed work of a training run
RSS_UNIT_BYTES = 1024  # ru_maxrss and VmHWM are in KiB on Linux
PROCESS_STATUS = Path("/proc/self/status")
PEAK_RESIDENT = "VmHWM:"

Item = TypeVar("Item")


class _Record:
    """This process's measurements so far."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.image_seconds: list[float] = []
        self.last_image_done: float | None = None


_RECORD = _Record()


def measuring() -> bool:
    """Whether a driver asked this process for its measurements."""
    return bool(os.environ.get(MEASUREMENTS_VARIABLE))


@contextmanager
def measured(kind: str) -> Iterator[None]:
    """Time the block as one unit of ``kind`` (``STEP``, ``EVALUATION``, ``SAVE``); a block that raises is not
    counted."""
    started = time.perf_counter()
    yield
    if measuring():
        _RECORD.seconds.setdefault(kind, []).append(time.perf_counter() - started)


def image_done(seconds: float) -> None:
    """One more image of the stage's list is done; it took ``seconds`` of this stage's time."""
    if measuring():
        _RECORD.image_seconds.append(seconds)
        _RECORD.last_image_done = time.perf_counter()


def work_done() -> None:
    """Background work on the images done so far ended (jobs drained): its time since the last image is added to
    that image."""
    if measuring() and _RECORD.image_seconds:
        now = time.perf_counter()
        _RECORD.image_seconds[-1] += now - _RECORD.last_image_done
        _RECORD.last_image_done = now


def measured_images(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` (the images of an inference loop), each timed from the loop's request for it to its request
    for the next (so the first holds the loader's start-up)."""
    started = time.perf_counter()
    for item in items:
        yield item
        now = time.perf_counter()
        image_done(now - started)
        started = now


def resident_peak() -> int:
    """This program's peak resident set in bytes: ``VmHWM`` where ``/proc`` has it, else ``ru_maxrss``."""
    if PROCESS_STATUS.is_file():
        for line in PROCESS_STATUS.read_text().splitlines():
            if line.startswith(PEAK_RESIDENT):
                return int(line.split()[1]) * RSS_UNIT_BYTES
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES


def peak_memory() -> dict[str, int | None]:
    """Peak bytes: the CUDA allocator's (None where this process did not use CUDA), this process's resident set
    and that of its largest finished child."""
    torch = sys.modules.get("torch")
    cuda = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = int(torch.cuda.max_memory_allocated())
    return {"peak_cuda_bytes": cuda, "peak_rss_bytes": resident_peak(),
            "peak_child_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * RSS_UNIT_BYTES}


def measurements() -> dict[str, Any]:
    """The JSON a driver reads: timed work, image counts and seconds, peak memory, this process's rank."""
    timed = _RECORD.image_seconds[1:]  # after the warm-up image
    return {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "seconds": _RECORD.seconds, "images": len(_RECORD.image_seconds), "image_work_seconds": sum(timed),
            "image_seconds": sum(timed) / len(timed) if timed else None, **peak_memory()}


def write_measurements() -> None:
    """``<$STAGE_MEASUREMENTS_DIR>/rank<RANK>.json`` when a driver asked for it (``run_main`` calls this)."""
    folder = os.environ.get(MEASUREMENTS_VARIABLE)
    if folder:
        rank = os.environ.get("RANK", "0")
        atomic_write_text(Path(folder) / f"rank{rank}{MEASUREMENTS_SUFFIX}", json.dumps(measurements()) + "\n")


def read_measurements(folder: Path) -> list[dict[str, Any]]:
    """What the ranks of a run wrote into ``folder``, by rank."""
    found = [json.loads(path.read_text()) for path in Path(folder).glob(f"rank*{MEASUREMENTS_SUFFIX}")]
    return sorted(found, key=lambda entry: entry["rank"])

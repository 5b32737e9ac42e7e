"""What a stage process measured of itself, for a driver that asks (``run_pipeline.py --preflight``).

When ``$STAGE_MEASUREMENTS_DIR`` names a folder, the process keeps

- the seconds of each optimiser step, evaluation pass and epoch-end save (``tools.training.engine``,
  through ``measured``);
- when each image of an inference or label loop is done (``measured_images`` around the loop; ``parallel_map``
  marks its items) and when background work on them ended (``work_done``, ``BackgroundJobs``),

and ``run_main`` writes them at its end to ``<folder>/rank<RANK>.json`` (``write_measurements``) with the
process's peak memory: the CUDA allocator's peak (``torch.cuda.max_memory_allocated``) where CUDA was used,
and the peak resident set of the process and of its largest finished child process (DataLoader workers, job
pools). Image work runs from the first image's end (the first image is the warm-up: worker start-up, lazy
initialisation) to the last mark, so ``image_seconds`` is the time per image after it. Without the variable
nothing is kept.
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
RSS_UNIT_BYTES = 1024  # ru_maxrss is in KiB on Linux

Item = TypeVar("Item")


class _Record:
    """This process's measurements so far."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.images = 0
        self.first_image_done: float | None = None
        self.work_end: float | None = None


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


def image_done() -> None:
    """One more image of the stage's list is done."""
    if not measuring():
        return
    now = time.perf_counter()
    _RECORD.images += 1
    if _RECORD.first_image_done is None:
        _RECORD.first_image_done = now
    _RECORD.work_end = now


def work_done() -> None:
    """Work on the images done so far ended (background jobs drained): the image work lasts until now."""
    if measuring() and _RECORD.images:
        _RECORD.work_end = time.perf_counter()


def measured_images(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` (the images of an inference loop), each marked done when the loop asks for the next."""
    for item in items:
        yield item
        image_done()


def peak_memory() -> dict[str, int | None]:
    """Peak bytes: the CUDA allocator's (None where this process did not use CUDA), this process's resident set
    and that of its largest finished child."""
    torch = sys.modules.get("torch")
    cuda = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = int(torch.cuda.max_memory_allocated())
    return {"peak_cuda_bytes": cuda,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES,
            "peak_child_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * RSS_UNIT_BYTES}


def measurements() -> dict[str, Any]:
    """The JSON a driver reads: timed work, image counts and seconds, peak memory, this process's rank."""
    record = _RECORD
    image_work = None if record.first_image_done is None else record.work_end - record.first_image_done
    return {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "seconds": record.seconds, "images": record.images, "image_work_seconds": image_work,
            "image_seconds": image_work / (record.images - 1) if record.images > 1 else None, **peak_memory()}


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

"""The preflight's rows: what one stage process measured, and the full run on this machine projected from it.

A training stage: ``start-up + (steps - 1) x s/step + evaluations x s/evaluation x (full evaluation list /
preflight's) + epochs x s/save`` (start-up holds the warm-up step, so the projection of the preflight's own
steps is its wall time); disk: everything the stage wrote (model, checkpoint, card, logs). An image stage
(inference, labels, an ``evaluate.py`` scoring pass): ``start-up + (images per process - 1) x s/image``; disk:
bytes per output file x the full list, plus the stage's other files.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from tools.cli.measurements import EVALUATION, SAVE, STEP
from tools.data.descriptor import DatasetDescriptor

LOG = logging.getLogger(__name__)

Outcome = tuple[float, list[dict], int]  # wall seconds, each rank's measurements, bytes written
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
BYTES_STEP = 1024
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
SCORING = ": scoring"  # title suffix of a stage's evaluate.py pass
COLUMNS = (("stage", 0, "<"), ("result", 7, "<"), ("start-up", 9, ">"), ("rate", 15, ">"),
           ("peak memory", 14, ">"), ("artifact", 18, ">"), ("full time", 10, ">"), ("full disk", 10, ">"))
MILLI = 1e-3


@dataclass
class Row:
    """One line of the preflight table (numbers None where the stage did not run)."""

    name: str
    title: str
    result: str = "passed"              # passed | failed | not run
    failure: str | None = None
    wall: float | None = None           # seconds of the preflight's process
    startup: float | None = None        # its wall time outside the timed work
    rate: float | None = None           # seconds per step or per image
    unit: str = ""                      # step | image
    timed: int = 0                      # steps or images timed
    peak_bytes: int | None = None
    peak_kind: str = ""                 # GPU (CUDA allocator) | RAM (largest process's resident set)
    artifact_bytes: float | None = None
    artifact_kind: str = ""             # model | per image
    full_units: int | None = None       # steps or images (per process) of the full run
    epochs: int | None = None           # of the full run (training)
    evaluations: int | None = None      # evaluation passes of the full run (training)
    evaluation_seconds: float = 0.0     # one of them, on the full evaluation list
    save_seconds: float = 0.0           # one epoch-end save (model and checkpoint)
    full_work: str = ""                 # what the full run does, in words
    projected_seconds: float | None = None
    projected_bytes: float | None = None


def human_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    unit = 0
    while count >= BYTES_STEP and unit < len(UNITS) - 1:
        count, unit = count / BYTES_STEP, unit + 1
    return f"{count:.0f} {UNITS[unit]}" if unit == 0 else f"{count:.3g} {UNITS[unit]}"


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 2 * MINUTE:
        return f"{seconds:.1f} s"
    if seconds < 2 * HOUR:
        return f"{seconds / MINUTE:.1f} min"
    if seconds < 2 * DAY:
        return f"{seconds / HOUR:.1f} h"
    return f"{seconds / DAY:.1f} d"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def peak(ranks: list[dict]) -> tuple[int, str]:
    """The largest CUDA allocator peak over the ranks, else the largest resident set of a process."""
    cuda = [rank["peak_cuda_bytes"] for rank in ranks if rank["peak_cuda_bytes"] is not None]
    if cuda:
        return max(cuda), "GPU"
    return max(max(rank["peak_rss_bytes"], rank["peak_child_rss_bytes"]) for rank in ranks), "RAM"


def list_ratio(domain: str | None, real: DatasetDescriptor, scratch: DatasetDescriptor) -> float:
    """How many times larger the full list ``domain`` is than the preflight's cut of it (1 without one)."""
    if domain is None or domain not in scratch.lists:
        return 1.0
    return len(real.read_ids(domain)) / len(scratch.read_ids(domain))


def failed_row(name: str, title: str, failure: str) -> Row:
    return Row(name, title, result="failed", failure=failure)


def skipped_row(name: str, title: str) -> Row:
    return Row(name, title, result="not run")


def training_row(name: str, title: str, args: argparse.Namespace, outcome: Outcome, model: Path,
                 real: DatasetDescriptor, scratch: DatasetDescriptor, warmup: int) -> Row:
    """A training stage's row: rank 0's step, evaluation and save times; the full run from the full list, the
    batch, ``--max_epoch`` / ``--max_iters`` and ``--eval_every`` of its command (``args``)."""
    wall, ranks, written = outcome
    seconds = ranks[0]["seconds"]
    timed = seconds.get(STEP, [])[warmup:]
    evaluations, saves = seconds.get(EVALUATION, []), seconds.get(SAVE, [])
    row = Row(name, title, wall=wall, startup=wall - sum(timed) - sum(evaluations) - sum(saves), unit="step",
              timed=len(timed), artifact_bytes=model.stat().st_size if model.is_file() else None,
              artifact_kind="model", projected_bytes=written)
    row.peak_bytes, row.peak_kind = peak(ranks)
    if not timed:
        row.result, row.failure = "failed", "no timed optimiser step was reported"
        return row
    row.rate = mean(timed)
    samples = len(real.read_ids(args.domain))
    per_epoch = samples // args.batch_size
    if per_epoch == 0:
        row.result = "failed"
        row.failure = (f"the full {args.domain} list has {samples} samples, fewer than --batch_size "
                       f"{args.batch_size}: the full run stops there")
        return row
    steps = getattr(args, "max_iters", None) or per_epoch * args.max_epoch
    epochs = math.ceil(steps / per_epoch)
    passes = sum(1 for epoch in range(1, epochs + 1) if epoch % args.eval_every == 0 or epoch == epochs)
    eval_domain = getattr(args, "eval_domain", None)
    row.full_units, row.epochs, row.evaluations = steps, epochs, passes if evaluations else 0
    row.evaluation_seconds = mean(evaluations) * list_ratio(eval_domain, real, scratch)
    row.save_seconds = mean(saves)
    row.projected_seconds = (row.startup + (steps - 1) * row.rate + row.evaluations * row.evaluation_seconds
                             + epochs * row.save_seconds)
    row.full_work = f"{steps:,} steps in {epochs:,} epochs, {row.evaluations:,} evaluations"
    if row.evaluations:
        listed = f" of {len(real.read_ids(eval_domain)):,} {eval_domain} images" if eval_domain in real.lists else ""
        row.full_work += f"{listed} ({human_seconds(row.evaluation_seconds)} each)"
    return row


def image_row(name: str, title: str, outcome: Outcome, full_images: int, processes: int,
              outputs: list[Path]) -> Row:
    """An image stage's row: the slowest rank's seconds per image; the full run on ``full_images`` over
    ``processes`` processes; disk from the ``outputs`` files made (the stage's other files once)."""
    wall, ranks, written = outcome
    rates = [rank["image_seconds"] for rank in ranks if rank["image_seconds"] is not None]
    work = max((rank["image_work_seconds"] or 0.0) for rank in ranks)
    output_bytes = sum(path.stat().st_size for path in outputs)
    row = Row(name, title, wall=wall, startup=wall - work, unit="image",
              timed=sum(max(rank["images"] - 1, 0) for rank in ranks))
    row.peak_bytes, row.peak_kind = peak(ranks)
    if outputs:
        row.artifact_bytes, row.artifact_kind = output_bytes / len(outputs), "per image"
    if not rates:
        row.result = "failed"
        row.failure = "fewer than 2 images per process to time: raise --preflight_images"
        return row
    row.rate = max(rates)
    row.full_units = math.ceil(full_images / processes)
    row.projected_seconds = row.startup + (row.full_units - 1) * row.rate
    row.projected_bytes = (row.artifact_bytes or 0.0) * full_images + written - output_bytes
    row.full_work = f"{full_images:,} images" + (f" on {processes} processes" if processes > 1 else "")
    return row


def describe(row: Row) -> str:
    """The lines printed when a stage's process ends."""
    if row.failure:
        return f"    {row.result}: {row.failure}"
    measured = (f"    passed in {human_seconds(row.wall)}: start-up {human_seconds(row.startup)}, "
                f"{human_rate(row.rate, row.unit)} ({row.timed} timed), peak {human_bytes(row.peak_bytes)} "
                f"{row.peak_kind}")
    if row.artifact_bytes is not None:
        measured += f", {row.artifact_kind} {human_bytes(row.artifact_bytes)}"
    return (f"{measured}\n    full run: {row.full_work}: {human_seconds(row.projected_seconds)}, "
            f"{human_bytes(row.projected_bytes)}")


def human_rate(seconds: float | None, unit: str) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3g} s/{unit}" if seconds >= 1 else f"{seconds / MILLI:.3g} ms/{unit}"


def cells(row: Row) -> list[str]:
    rate = human_rate(row.rate, row.unit)
    peak_text = "-" if row.peak_bytes is None else f"{human_bytes(row.peak_bytes)} {row.peak_kind}"
    artifact = "-" if row.artifact_bytes is None else f"{human_bytes(row.artifact_bytes)} {row.artifact_kind}"
    return [row.title, row.result, human_seconds(row.startup), rate, peak_text, artifact,
            human_seconds(row.projected_seconds), human_bytes(row.projected_bytes)]


def table_line(values: list[str], first_width: int) -> str:
    return "  ".join(f"{value:{align}{width or first_width}}" for value, (_, width, align) in zip(values, COLUMNS))


def print_table(rows: list[Row], seconds: float) -> None:
    """The table of every stage, its totals and the failure, if any, under it."""
    complete = all(row.result == "passed" for row in rows)
    total = "total" if complete else "total (stages that passed)"
    width = max(len(text) for text in [total, *(row.title for row in rows)])
    LOG.info("\n" + table_line([name for name, _, _ in COLUMNS], width))
    for row in rows:
        LOG.info(table_line(cells(row), width))
    total_seconds = sum(row.projected_seconds or 0.0 for row in rows)
    total_bytes = sum(row.projected_bytes or 0.0 for row in rows)
    LOG.info(table_line([total, "", "", "", "", "", human_seconds(total_seconds), human_bytes(total_bytes)], width))
    LOG.info(f"preflight {human_seconds(seconds)}; the full recipe on this machine: about "
             f"{human_seconds(total_seconds)} and {human_bytes(total_bytes)} of disk")
    for row in rows:
        if row.failure:
            LOG.info(f"{row.name}: {row.failure}")

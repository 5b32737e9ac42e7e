"""Timing one benchmark row in a fresh process: seconds per call and peak memory.

Each row runs in a process forked from a server that has only imported the libraries, so rows cannot
mask each other's peaks, thread pools or allocator caches, and the imports are paid once. Peak memory is
the CUDA allocator's peak on a GPU; on the CPU the growth of the peak resident set size over the row's
process after its imports (worker processes included: their largest peak counts).
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from tools.benchmark.stages import STAGES, Bench, Setup

MIB = 2**20
RSS_UNITS_PER_MIB = 1024  # ru_maxrss is in KiB on Linux
# What the fork server imports once for every row: the libraries that take seconds to import.
PRELOAD_MODULES = ["torch", "torchvision", "timm", "cv2"]


@dataclass(frozen=True)
class Job:
    """One row: a stage at a size, where and how it runs (``amp`` resolved: off, bf16, fp16 or None for a
    stage without autocast), measured in ``repeats`` fresh processes."""

    stage: str
    config: str
    bench: Bench
    device: str
    amp: str | None
    jobs: int | None
    threads: int | None
    grad_checkpointing: bool
    batch_size: int | None
    repeats: int
    script_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """Seconds per call, peak memory (MiB), and the call's items and ``(H, W)``."""

    seconds: float
    peak_mib: float
    batch: int
    size: tuple[int, int]


def peak_rss_mib() -> float:
    """The largest peak resident set size of this process and its finished children, in MiB."""
    peaks = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(peaks) / RSS_UNITS_PER_MIB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(run: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``steps`` calls of ``run`` after ``warmup`` untimed ones, each synchronised."""
    elapsed = 0.0
    for call in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if call >= warmup:
            elapsed += time.perf_counter() - start
    return elapsed / steps


def silence_output() -> None:
    """Send this process's stdout and stderr (progress bars, library warnings) to the null device."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def measure(job: Job) -> Measurement:
    """The row of ``job`` measured in this (fresh) process."""
    silence_output()
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(0)
    device = torch.device(job.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_rss_mib()
    with ExitStack() as cleanup:
        setup = Setup(device, job.amp or "off", job.jobs, job.grad_checkpointing, job.batch_size, cleanup,
                      job.script_flags)
        prepared = STAGES[job.stage].prepare(job.bench, setup)
        seconds = timed_seconds(prepared.run, job.bench.steps, job.bench.warmup, device)
        peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else peak_rss_mib() - baseline
        return Measurement(seconds, peak, prepared.batch, prepared.size)


def fork_server() -> multiprocessing.context.BaseContext:
    """The fork-server context every row's process comes from (the server imports ``PRELOAD_MODULES``)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD_MODULES)
    return context


def measure_in_new_process(job: Job, context: multiprocessing.context.BaseContext) -> Measurement:
    """``measure(job)`` in a process of its own, forked by the server of ``context``."""
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure, job).result()

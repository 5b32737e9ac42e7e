"""Per-image jobs on all cores: a mapped list with a progress bar (CRF passes, label writing, evaluation)
and background jobs fed by a producer (segmentation CRFs behind the model). Both tell a measuring driver
(``tools.cli.measurements``) when each image and the background work are done."""
from __future__ import annotations

import functools
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from tools.cli.measurements import image_done, work_done

Item = TypeVar("Item")
Result = TypeVar("Result")


def default_jobs() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def timed_call(function: Callable[[Item], Result], item: Item) -> tuple[Result, float]:
    """``function(item)`` and its seconds, measured where it runs (a pool worker)."""
    started = time.perf_counter()
    result = function(item)
    return result, time.perf_counter() - started


def parallel_map(
    function: Callable[[Item], Result], items: list[Item], n_jobs: int, desc: str, chunksize: int = 4
) -> Iterator[Result]:
    """Yield ``function(item)`` for every item, in order, on ``n_jobs`` processes (1 = in process).

    ``function`` must be picklable (a module-level function or a ``functools.partial`` of one). Each item's
    seconds, divided by ``n_jobs`` (the processes that share a long list's work), go to a measuring driver
    (``image_done``).
    """
    progress = tqdm(total=len(items), desc=desc, dynamic_ncols=True)
    results: Iterable[tuple[Result, float]]
    timed = functools.partial(timed_call, function)
    if n_jobs <= 1 or len(items) <= 1:
        results = map(timed, items)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(min(n_jobs, len(items)))
        results = pool.imap(timed, items, chunksize=chunksize)
    finished = False
    try:
        for result, seconds in results:
            progress.update()
            image_done(seconds / max(n_jobs, 1))
            yield result
        finished = True
    finally:
        progress.close()
        if pool is not None:
            if finished:  # let the workers exit by themselves: no signal needed
                pool.close()
            else:
                pool.terminate()
            pool.join()


class BackgroundJobs:
    """Runs ``function(*args)`` on ``n_jobs`` worker processes while the caller prepares more work.

    Used where a model produces per-image work for the CPU (dense CRFs): at most ``max_pending`` jobs
    wait at once, so memory stays bounded; the first failure is re-raised by ``submit`` or on exit.
    Workers come from a ``forkserver``, never a fork of a process that may hold CUDA state.
    ``n_jobs <= 1`` runs every job at once in this process. Use it as a context manager.
    """

    def __init__(self, n_jobs: int, max_pending: int | None = None) -> None:
        self.n_jobs = n_jobs
        self.max_pending = max_pending or 2 * n_jobs
        self._executor: ProcessPoolExecutor | None = None
        self._pending: list[Future] = []

    def __enter__(self) -> BackgroundJobs:
        if self.n_jobs > 1:
            self._executor = ProcessPoolExecutor(self.n_jobs, mp_context=multiprocessing.get_context("forkserver"))
        return self

    def submit(self, function: Callable[..., object], *args: object) -> None:
        if self._executor is None:
            function(*args)
            return
        self._pending.append(self._executor.submit(function, *args))
        while len(self._pending) >= self.max_pending:
            self._collect(wait(self._pending, return_when=FIRST_COMPLETED).done)

    def _collect(self, finished: set[Future]) -> None:
        self._pending = [future for future in self._pending if future not in finished]
        for future in finished:
            future.result()

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if self._executor is None:
            return
        try:
            if error is None:
                self._collect(set(wait(self._pending).done))
                work_done()
        finally:
            self._executor.shutdown(wait=error is None, cancel_futures=True)

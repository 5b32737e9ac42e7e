"""Per-image jobs on all cores with a progress bar (CRF passes, label writing, evaluation)."""
from __future__ import annotations

import multiprocessing
import os
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


def default_jobs() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(
    function: Callable[[Item], Result], items: list[Item], n_jobs: int, desc: str, chunksize: int = 4
) -> Iterator[Result]:
    """Yield ``function(item)`` for every item, in order, on ``n_jobs`` processes (1 = in process).

    ``function`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    progress = tqdm(total=len(items), desc=desc, dynamic_ncols=True)
    results: Iterable[Result]
    if n_jobs <= 1 or len(items) <= 1:
        results = map(function, items)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(min(n_jobs, len(items)))
        results = pool.imap(function, items, chunksize=chunksize)
    try:
        for result in results:
            progress.update()
            yield result
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()

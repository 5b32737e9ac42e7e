"""Reproducible training data: seeding, per-sample augmentation seeds and a resumable epoch order.

Two properties make a run repeatable and resumable to the bit:
- the sample order of epoch ``e`` is ``DistributedSampler``'s permutation for ``(seed, e)``, also with
  one process, so the global batch of step ``s`` is ``permutation[s*B:(s+1)*B]`` whatever the number of
  processes or accumulation steps;
- each sample is augmented with its RNGs seeded from ``(seed, epoch, index)``, so its augmentation does
  not depend on the worker that loads it, on the number of workers, or on where a run was resumed.
"""
from __future__ import annotations

import atexit
import multiprocessing
import random
import signal
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from tools.cli.arguments import UsageError

NUMPY_SEED_MODULUS = 2**32


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA), as the original's ``set_seed``."""
    random.seed(seed)
    np.random.seed(seed % NUMPY_SEED_MODULUS)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that is a pure function of ``(seed, epoch, index)``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch-CPU RNGs seeded to ``seed``, then restore their states,
    so a transform in the main process (``num_workers=0``) leaves the training RNG untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededDataset(Dataset):
    """``dataset[index]`` computed with its RNGs seeded from ``(seed, epoch, index)``.

    Call ``set_epoch`` before creating the epoch's DataLoader iterator (workers copy the dataset
    when the iterator starts; do not use ``persistent_workers``).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with isolated_rng(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


class RepeatedDataset(Dataset):
    """``dataset`` repeated to ``length`` samples (``--max_steps``: a short run needs whole batches even when the
    training list is smaller than one)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


class EpochSampler(Sampler[int]):
    """This rank's sample indices of one epoch, cut to whole optimiser steps (``drop_last``).

    ``set_epoch(epoch, start_step)`` selects the epoch's permutation and skips the ``start_step``
    steps a resumed run already took, so the remaining batches are exactly the uninterrupted run's.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int,
                 samples_per_step: int, steps_per_epoch: int) -> None:
        self.order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.samples_per_step, self.steps_per_epoch = samples_per_step, steps_per_epoch
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.order.set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        indices = list(self.order)
        return iter(indices[self.start_step * self.samples_per_step: self.steps_per_epoch * self.samples_per_step])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.samples_per_step


def micro_batch_size(batch_size: int, world_size: int, accum_steps: int) -> int:
    """Per-rank micro-batch: the global ``batch_size`` split over ranks and accumulation steps."""
    if accum_steps < 1:
        raise UsageError(f"--accum_steps must be >= 1, got {accum_steps}")
    parts = world_size * accum_steps
    if batch_size % parts != 0:
        raise UsageError(
            f"--batch_size {batch_size} (the global batch) is not divisible by world_size {world_size} x "
            f"--accum_steps {accum_steps} = {parts}; choose a batch size or --accum_steps that divides"
        )
    return batch_size // parts


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM (a Ctrl-C reaches the whole process
    group, a cluster's SIGTERM every process of the job), so the main process can finish its step and
    save a checkpoint. They exit when the main process ends its iterator, and ``stop_workers_at_exit``
    kills any left when it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers_at_exit() -> None:
    """Kill the child processes still running when this process exits (after an error or a second
    Ctrl-C a DataLoader iterator may not have shut its workers down). Without this, the exit would wait
    forever: ``multiprocessing`` stops children with SIGTERM, which the workers ignore."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


# Registered after torch imported multiprocessing, so it runs before multiprocessing's own exit handler.
atexit.register(stop_workers_at_exit)

"""Process-group setup for training: one process without torchrun, one per GPU with it.

``torchrun --nproc_per_node=N train_x.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` reads them and joins the group (NCCL on
CUDA, gloo on CPU). Started as a plain ``python train_x.py``, it makes no process group and every
collective below is a no-op, so scripts call them unconditionally.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tools.training.precision import allow_tf32

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``is_main`` (rank 0) writes logs and checkpoints."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.is_distributed:
            dist.barrier()


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun process group if there is one; pick this process's device.

    ``device`` overrides the default (``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        chosen = torch.device(device)
    else:
        chosen = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    allow_tf32(chosen)
    if world_size > 1:
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} are not set; start multi-process "
                "training with torchrun --nproc_per_node=N"
            )
        if not dist.is_initialized():
            backend = "nccl" if chosen.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, chosen, is_main=rank == 0)


def destroy_distributed() -> None:
    """Leave the process group (call once at the end of a script; safe without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], context: DistContext) -> dict[str, float]:
    """Average each value over the ranks (every rank must pass the same keys)."""
    if not context.is_distributed or not values:
        return dict(values)
    names = sorted(values)
    stacked = torch.tensor([values[name] for name in names], dtype=torch.float64, device=context.device)
    dist.all_reduce(stacked)
    return {name: value / context.world_size for name, value in zip(names, stacked.tolist())}


def any_rank(flag: bool, context: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop at the same step)."""
    return any_ranks([flag], context)[0]


def any_ranks(flags: list[bool], context: DistContext) -> list[bool]:
    """Each flag true on every rank if it is true on any rank, in one collective."""
    if not context.is_distributed:
        return list(flags)
    values = torch.tensor([int(flag) for flag in flags], device=context.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this worker after a failure (``--max_restarts``): its command is the first
    start's, so training continues its checkpoint as with ``--resume auto``."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def gather_to_all(value: Any, context: DistContext) -> list[Any]:
    """Every rank's ``value`` (a small picklable object), in rank order."""
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def inference_device(requested: str | None = None) -> torch.device:
    """``--device`` if given (checked by ``parse_device``), else this torchrun rank's GPU (``LOCAL_RANK``),
    else the CPU; TF32 matmuls allowed on CUDA (``tools.precision.allow_tf32``)."""
    if requested:
        device = torch.device(requested)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    allow_tf32(device)
    return device


def parse_device(text: str) -> str:
    """argparse type of ``--device``: a torch device name that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return text


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device`` of an inference script (default: this rank's GPU, else the CPU)."""
    parser.add_argument("--device", type=parse_device, default=None, help="default: this rank's GPU, else the CPU")

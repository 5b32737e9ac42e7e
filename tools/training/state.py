"""Full training checkpoints: atomic save, pickle-free load, RNG states as tensors.

A checkpoint is a dict of tensors and plain Python values only, so ``torch.load(weights_only=True)``
reads it; it is written to a temporary file and renamed, so a kill during the write leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from core.checkpoint import unreadable_checkpoint
from tools.artifacts.files import ArtifactError, IncompleteWrite, atomic_path

PLAIN_TYPES = (bool, int, float, str, type(None))
STREAM_WRITER_FAILURES = ("PytorchStreamWriter", "inline_container")  # torch's words for a write that failed


def write_tensors(content: Mapping[str, Any], temporary: Path) -> None:
    """``torch.save`` into ``atomic_path``'s temporary file. Torch reports a write that did not reach the disk
    (full, over quota) as a ``RuntimeError`` of its stream writer: it becomes an ``IncompleteWrite``, which
    ``atomic_path`` turns into one line naming the file."""
    try:
        torch.save(dict(content), temporary)
    except RuntimeError as error:
        if not any(marker in str(error) for marker in STREAM_WRITER_FAILURES):
            raise
        raise IncompleteWrite(f"torch's writer failed: {str(error).strip().splitlines()[0]}") from error


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it onto ``path``."""
    with atomic_path(path) as temporary:
        write_tensors(state, temporary)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or state dict onto the CPU without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise unreadable_checkpoint(path, error) from error


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch-CPU and (if available) current-CUDA-device RNG states as tensors/plain values."""
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": python_version,
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": python_gauss,
        "numpy_keys": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_position": int(numpy_position),
        "numpy_has_gauss": int(numpy_has_gauss),
        "numpy_gauss": float(numpy_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    np.random.set_state((
        "MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_position"],
        state["numpy_has_gauss"], state["numpy_gauss"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config / argparse namespace dict that ``weights_only`` loading accepts:
    plain scalars and lists of them kept, anything else (paths, enums) as its string."""
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, PLAIN_TYPES):
            converted[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(item, PLAIN_TYPES) for item in value):
            converted[name] = list(value)
        else:
            converted[name] = str(value)
    return converted


def config_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    """``'name: saved -> current'`` for each of ``names`` whose value changed."""
    return [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
            for name in names if saved.get(name) != current.get(name)]

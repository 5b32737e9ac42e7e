"""Atomic artifact I/O: every write goes to a temporary file in the same folder and is renamed into
place, so a killed run never leaves a truncated file that a rerun would mistake for a finished one.
Also the readers of the small files every stage shares (JSON records, label PNGs)."""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

FILE_MODE = 0o666  # before the umask, as open() creates files
TEMPORARY_SUFFIX = ".tmp"  # atomic_path's temporary files: .<name>.<random>.tmp beside the target
FREE_SPACE = ("free space there or pass --experiments_dir on another disk, then rerun the same command (training: "
              "plus --resume auto); finished files are kept")
WRITABLE = ("make the folder writable or pass --experiments_dir elsewhere, then rerun the same command (training: "
            "plus --resume auto); finished files are kept")
WRITE_FAILURES = {  # errno of a failed write -> what to do
    errno.ENOSPC: FREE_SPACE,
    errno.EDQUOT: FREE_SPACE,
    errno.EROFS: WRITABLE,
    errno.EACCES: WRITABLE,
}


class ArtifactError(ValueError):
    """A missing, incomplete or unreadable artifact: the message names the file."""


class IncompleteWrite(OSError):
    """A library's own report that its bytes did not reach the file (torch's stream writer), errno unknown."""


def write_failure_advice(error: OSError) -> str | None:
    """What to do about a failed write (disk full, quota, read-only or forbidden folder, a writer's own
    failure report); None for an ``OSError`` that is not one of these."""
    if isinstance(error, IncompleteWrite):
        return f"the disk may be full or over quota: {FREE_SPACE}"
    return WRITE_FAILURES.get(error.errno)



def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A failed write (``write_failure_advice``) becomes an ``ArtifactError`` naming ``path`` and what to do,
    and the temporary file is removed: the previous ``path``, if any, stays as it was."""
    path = Path(path)
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.close(handle)
        temporary = Path(name)
        os.chmod(temporary, FILE_MODE & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        advice = write_failure_advice(error)
        if advice is None:
            raise
        raise ArtifactError(f"{path}: cannot write it ({error.strerror or error}); {advice}") from error
    finally:
        if temporary is not None and temporary.exists():
            temporary.unlink()


def remove_stale_temporaries(folder: Path, name: str = "*") -> int:
    """Delete the temporary files ``atomic_path`` left in ``folder`` for ``name`` (every file by default) when
    a run was killed mid-write; call it only while holding the folder's writer lock. Returns how many."""
    stale = list(Path(folder).glob(f".{name}.*{TEMPORARY_SUFFIX}")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed ``.npz`` atomically (no pickled objects inside)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def save_png(path: str | Path, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a ``(H, W)`` uint8 label map as PNG: palette mode ``P`` if a palette is given, else ``L``."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: a label PNG needs a (H, W) array, got shape {label.shape}")
    image = Image.fromarray(label.astype(np.uint8), mode="P" if palette is not None else "L")
    if palette is not None:
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | Path, what: str, default: Any = None) -> Any:
    """A JSON file's content (``default`` if the file does not exist); a damaged or non-object file is an
    ``ArtifactError`` naming it and ``what`` it should hold."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path}: unreadable {what} ({error}); delete or repair it") from error
    if not isinstance(content, dict):
        raise ArtifactError(f"{path}: the {what} must be a JSON object, found a JSON {type(content).__name__}")
    return content



def load_label_png(path: str | Path, error: type[Exception] = ArtifactError, what: str = "label PNG") -> np.ndarray:
    """A palette or grayscale PNG as ``(H, W)`` uint8 indices (never converted through RGB).

    Problems raise ``error`` with a message naming the file and ``what`` it should have been.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise error(f"{path}: {what} must be a palette or grayscale PNG, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except error:
        raise
    except Exception as problem:
        raise error(f"{path}: unreadable {what} ({problem})") from problem



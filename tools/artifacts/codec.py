"""The compact format of CAM and random-walk files (format 2) and its decoding.

Two formats exist, both read into float32 arrays by ``tools.artifacts.predictions.load_prediction``:

- format 1 (no ``format`` array): the score arrays as float32, uncompressed (``save_npz``; the
  baseline CAMs and files of earlier versions).
- format 2 (``format`` = 2): each score array, in ``[0, MAX_SCORE]``, as uint16 codes ``q`` of the grid
  ``g[q] = q / scale``, ``scale`` = ``SCORE_SCALE`` steps per unit: ``q`` names the interval
  ``(g[q-1], g[q]]`` holding the score, which reads back as the interval's middle (0 as 0). So
  ``score > th`` is unchanged for every threshold ``th`` on the grid (all thresholds with up to four
  decimals) and any score moves by at most half a step (1/120000). The codes are stored as planar
  prediction residuals (``q - left - up + up-left``, modulo 2^16), near zero on smooth maps, in a
  deflated ``.npz``: 7x smaller than format 1 for CAMs, 10-16x for walks.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from tools.artifacts.files import ArtifactError

FORMAT_KEY = "format"  # the format version array of a prediction file; absent in format 1
SCALE_KEY = "scale"  # grid steps per unit of a format-2 file: always SCORE_SCALE
PLAIN_FORMAT = 1  # float32 score arrays as they are
COMPACT_FORMAT = 2  # uint16 grid codes, planar-predicted, deflated
SCORE_NAMES = ("cam", "hr_cam", "rw", "rw_bg")  # the score arrays of CAM and random-walk files
CODE_DTYPE = np.uint16
SCORE_SCALE = 60000  # steps per unit: a multiple of 10^4, so 4-decimal thresholds lie on the grid
MAX_SCORE = np.iinfo(CODE_DTYPE).max / SCORE_SCALE  # 1.09225: the largest storable score
DEFLATE_LEVEL = 4  # on CAM residuals 4x faster than zlib's default 6, for files 2% larger


def encode_compact(keys: np.ndarray, scores: dict[str, np.ndarray], what: str) -> bytes:
    """The bytes of a format-2 ``.npz``: ``keys`` and each score array as planar residuals of its grid codes;
    ``what`` names the file in errors."""
    arrays = {FORMAT_KEY: np.int64(COMPACT_FORMAT), SCALE_KEY: np.float32(SCORE_SCALE),
              "keys": np.asarray(keys, dtype=np.int64)}
    for name, values in scores.items():
        arrays[name] = planar_residuals(quantise_scores(values, f"{what}: '{name}'"))
    return _deflated_npz(arrays)


def _deflated_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an ``.npz`` as ``np.savez_compressed`` writes it, but deflated at ``DEFLATE_LEVEL``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=DEFLATE_LEVEL) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
    return buffer.getvalue()


def quantise_scores(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    """Grid codes (uint16, same shape) of scores in ``[0, MAX_SCORE]``: each score's smallest code ``q``
    with ``grid_value(q) >= score``, so the code says which grid interval ``(g[q-1], g[q]]`` holds it.

    Raises ``ValueError`` naming ``what`` for non-finite scores or scores outside the range.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if not np.all(np.isfinite(scores)) or (scores.size and scores.min() < 0):
        raise ValueError(f"{what}: compact files hold finite, non-negative scores")
    codes = np.ceil(scores.astype(np.float64) * SCORE_SCALE).astype(np.int64)
    codes += grid_value(codes) < scores  # float rounding can leave the ceiling one step off either way
    lower = np.maximum(codes - 1, 0)
    codes = np.where((codes > 0) & (grid_value(lower) >= scores), lower, codes)
    if codes.size and codes.max() > np.iinfo(CODE_DTYPE).max:
        raise ValueError(f"{what}: compact files hold scores up to {MAX_SCORE:.5f}, got {scores.max()}")
    return codes.astype(CODE_DTYPE)


def grid_value(codes: np.ndarray) -> np.ndarray:
    """The float32 grid values ``g[q] = q / SCORE_SCALE`` (same shape) of integer codes: as thresholds."""
    return np.asarray(codes).astype(np.float32) / np.float32(SCORE_SCALE)


def dequantise(codes: np.ndarray) -> np.ndarray:
    """Float32 scores (same shape) of grid codes: the middle of the interval ``(g[q-1], g[q]]``, 0 for 0.

    The middle lies strictly between grid values, so ``score > th`` reads as it was written for every
    grid threshold ``th``, and a score is off by at most half a step.
    """
    middle = (np.asarray(codes).astype(np.float32) - np.float32(0.5)) / np.float32(SCORE_SCALE)
    return np.maximum(middle, np.float32(0))


def planar_residuals(codes: np.ndarray) -> np.ndarray:
    """``q[y, x] - q[y, x-1] - q[y-1, x] + q[y-1, x-1]`` modulo 2^16 (outside the map counts as 0) of
    uint16 codes ``(..., h, w)``: small numbers on smooth maps, which deflate well."""
    along_rows = np.diff(codes, axis=-1, prepend=np.zeros_like(codes[..., :1]))
    return np.diff(along_rows, axis=-2, prepend=np.zeros_like(along_rows[..., :1, :]))


def planar_codes(residuals: np.ndarray) -> np.ndarray:
    """The uint16 codes ``(..., h, w)`` of their ``planar_residuals``: cumulative sums modulo 2^16."""
    return np.cumsum(np.cumsum(residuals, axis=-2, dtype=CODE_DTYPE), axis=-1, dtype=CODE_DTYPE)



def decode_prediction(arrays: dict[str, np.ndarray], path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a prediction file with its score arrays as float32, whatever the format version."""
    if FORMAT_KEY not in arrays:
        return arrays  # format 1: float32 as stored
    arrays = dict(arrays)
    version = _format_version(arrays.pop(FORMAT_KEY), path)
    if version != COMPACT_FORMAT:
        raise ArtifactError(f"{path}: prediction format {version} is unknown (this version reads formats "
                            f"{PLAIN_FORMAT} and {COMPACT_FORMAT}); update the code or remake the file")
    if SCALE_KEY not in arrays:
        raise ArtifactError(f"{path}: a format-{COMPACT_FORMAT} prediction needs a '{SCALE_KEY}' array")
    _check_scale(arrays.pop(SCALE_KEY), path)
    for name in SCORE_NAMES:
        if name in arrays:
            arrays[name] = dequantise(planar_codes(_grid_residuals(arrays[name], name, path)))
    return arrays


def _format_version(value: np.ndarray, path: str | Path) -> int:
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ArtifactError(f"{path}: '{FORMAT_KEY}' must be an integer scalar, got {value.dtype} {value.shape}")
    return int(value)


def _check_scale(value: np.ndarray, path: str | Path) -> None:
    """Format 2 fixes the grid: its ``scale`` must be the scalar ``SCORE_SCALE`` (else the file is damaged)."""
    if value.shape != () or value.dtype.kind not in "iuf" or float(value) != SCORE_SCALE:
        shown = value.tolist() if value.size == 1 else f"{value.dtype} array of shape {value.shape}"
        raise ArtifactError(f"{path}: '{SCALE_KEY}' of a format-{COMPACT_FORMAT} prediction must be {SCORE_SCALE} "
                            f"(steps per unit), got {shown}; the file is damaged, remake it")


def _grid_residuals(value: np.ndarray, name: str, path: str | Path) -> np.ndarray:
    if value.dtype != CODE_DTYPE or value.ndim < 2:
        raise ArtifactError(f"{path}: '{name}' of a format-{COMPACT_FORMAT} prediction must be {CODE_DTYPE.__name__} "
                            f"residuals (..., h, w), got {value.dtype} {value.shape}")
    return value



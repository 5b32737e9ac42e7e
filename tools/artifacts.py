"""Experiment folders, experiment names and atomic artifact I/O shared by every stage.

Layout (``root`` defaults to ``experiments/``)::

    models/<tag>.pth                 best weights, the next stage's input
    models/<tag>.json                their model config and provenance (tools.provenance)
    models/<tag>.last.pth            full training checkpoint for --resume
    logs/<tag>.txt, logs/<tag>.json  text and JSON logs
    tensorboards/<tag>/              TensorBoard events
    predictions/<experiment name>/   one file per image id (.npz CAMs / random walk, .png labels)

Every write goes to a temporary file in the same folder and is renamed into place, so a killed run
never leaves a truncated file that a rerun would mistake for a finished one.

CAM and random-walk files come in two formats, both read by ``load_prediction`` into float32 arrays:

- format 1 (no ``format`` array): the score arrays as float32, uncompressed (``save_npz``; the
  baseline CAMs and files of earlier versions).
- format 2 (``format`` = 2, ``save_cams`` / ``save_walk``): each score array, in ``[0, MAX_SCORE]``,
  as uint16 codes ``q`` of the grid ``g[q] = q / scale``, ``scale`` = ``SCORE_SCALE`` steps per unit:
  ``q`` names the interval ``(g[q-1], g[q]]`` holding the score, which reads back as the interval's
  middle (0 as 0). So ``score > th`` is unchanged for every threshold ``th`` on the grid (all
  thresholds with up to four decimals) and any score moves by at most half a step (1/120000). The
  codes are stored as planar prediction residuals (``q - left - up + up-left``, modulo 2^16), near
  zero on smooth maps, in a deflated ``.npz``: 7x smaller than format 1 for CAMs, 10-16x for walks.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

LOG = logging.getLogger(__name__)

CAM_SUFFIX = ".npz"
LEGACY_SUFFIX = ".npy"
PNG_SUFFIX = ".png"
CAM_STRIDE = 4  # the stride of the CAMs' 'cam' array and of the random walk's grid
FILE_MODE = 0o666  # before the umask, as open() creates files

FORMAT_KEY = "format"  # the format version array of a prediction file; absent in format 1
SCALE_KEY = "scale"  # grid steps per unit of a format-2 file: always SCORE_SCALE
PLAIN_FORMAT = 1  # float32 score arrays as they are
COMPACT_FORMAT = 2  # uint16 grid codes, planar-predicted, deflated
SCORE_NAMES = ("cam", "hr_cam", "rw", "rw_bg")  # the score arrays of CAM and random-walk files
CODE_DTYPE = np.uint16
SCORE_SCALE = 60000  # steps per unit: a multiple of 10^4, so 4-decimal thresholds lie on the grid
MAX_SCORE = np.iinfo(CODE_DTYPE).max / SCORE_SCALE  # 1.09225: the largest storable score
DEFLATE_LEVEL = 4  # on CAM residuals 4x faster than zlib's default 6, for files 2% larger


class ArtifactError(ValueError):
    """A missing, incomplete or unreadable artifact: the message names the file."""


# ----------------------------------------------------------------------------- naming
def domain_tag(domain: str) -> str:
    """The original tags every domain containing 'train' (train, train_aug) as ``train``, else ``val``."""
    return "train" if "train" in domain else "val"


def format_scales(scales: list[float] | tuple[float, ...]) -> str:
    """``[0.5, 1.0]`` -> ``'0.5,1.0'`` as in the original's folder names."""
    return ",".join(str(float(scale)) for scale in scales)


def cam_experiment_name(tag: str, domain: str, scales: list[float] | tuple[float, ...]) -> str:
    return f"{tag}@{domain_tag(domain)}@scale={format_scales(scales)}"


def affinity_label_name(cam_experiment: str, fg_threshold: float, bg_threshold: float) -> str:
    return f"{cam_experiment}@aff_fg={fg_threshold:.2f}_bg={bg_threshold:.2f}"


def random_walk_name(model_name: str, domain: str, beta: int, exp_times: int) -> str:
    return f"{model_name}@{domain_tag(domain)}@beta={beta}@exp_times={exp_times}@rw"


def pseudo_label_name(experiment_name: str, crf_iteration: int) -> str:
    return f"{experiment_name}@crf={crf_iteration}"


@dataclass(frozen=True)
class ExperimentPaths:
    """Where a stage reads and writes its artifacts."""

    root: Path = Path("experiments")

    def model(self, tag: str) -> Path:
        return self.root / "models" / f"{tag}.pth"

    def model_config(self, tag: str) -> Path:
        """The model's config and provenance, written together with ``model(tag)``."""
        return self.model(tag).with_suffix(".json")

    def checkpoint(self, tag: str) -> Path:
        return self.root / "models" / f"{tag}.last.pth"

    def text_log(self, tag: str) -> Path:
        return self.root / "logs" / f"{tag}.txt"

    def json_log(self, tag: str) -> Path:
        return self.root / "logs" / f"{tag}.json"

    def tensorboard(self, tag: str) -> Path:
        return self.root / "tensorboards" / tag

    def predictions(self, experiment_name: str) -> Path:
        return self.root / "predictions" / experiment_name


# ----------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    os.chmod(temporary, FILE_MODE & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


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


def save_cams(path: str | Path, keys: np.ndarray, cam: np.ndarray, hr_cam: np.ndarray) -> None:
    """Write a CAM file in the compact format 2, atomically.

    ``keys`` ``(n + 1,)`` background 0 then the present class ids; ``cam`` ``(n, ceil(H/4), ceil(W/4))``
    and ``hr_cam`` ``(n, H, W)`` scores in ``[0, MAX_SCORE]`` (max-normalised CAMs).
    """
    _save_compact(path, keys, {"cam": cam, "hr_cam": hr_cam})


def save_walk(path: str | Path, keys: np.ndarray, rw: np.ndarray, rw_bg: np.ndarray | None = None) -> None:
    """Write a random-walk file in the compact format 2, atomically.

    ``keys`` ``(n + 1,)`` as in ``save_cams``; ``rw`` ``(n, H, W)`` and the propagated background
    ``rw_bg`` ``(H, W)`` (if any) scores in ``[0, MAX_SCORE]`` (normalised to a maximum of 1).
    """
    scores = {"rw": rw} if rw_bg is None else {"rw": rw, "rw_bg": rw_bg}
    _save_compact(path, keys, scores)


def _save_compact(path: str | Path, keys: np.ndarray, scores: dict[str, np.ndarray]) -> None:
    arrays = {FORMAT_KEY: np.int64(COMPACT_FORMAT), SCALE_KEY: np.float32(SCORE_SCALE),
              "keys": np.asarray(keys, dtype=np.int64)}
    for name, values in scores.items():
        arrays[name] = planar_residuals(quantise_scores(values, f"{path}: '{name}'"))
    atomic_write_bytes(path, _deflated_npz(arrays))


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


# ----------------------------------------------------------------------------- reading
def prediction_file(directory: str | Path, image_id: str) -> Path:
    """The CAM / random-walk file of an id: ``<id>.npz``, or a legacy ``<id>.npy`` if only that exists."""
    directory = Path(directory)
    native = directory / f"{image_id}{CAM_SUFFIX}"
    legacy = directory / f"{image_id}{LEGACY_SUFFIX}"
    return legacy if not native.exists() and legacy.exists() else native


def load_prediction(
    path: str | Path,
    num_classes: int,
    *,
    allow_pickle: bool = False,
    image_size: tuple[int, int] | None = None,
    require: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Read a CAM or random-walk artifact into ``{'keys', 'cam'?, 'hr_cam'?, 'rw'?, 'rw_bg'?}``, checked.

    ``.npz`` files are read without pickle. The original repository's ``.npy`` files are pickled
    Python dicts: they are read only with ``allow_pickle=True`` (``--allow_pickle`` on the command
    line), and torch tensors inside them are converted to numpy. Every reader goes through
    ``check_prediction`` (``num_classes`` with background; ``image_size`` ``(H, W)`` of the photo if
    known; ``require``: the arrays the caller needs), so a damaged file stops the stage naming it.
    """
    content = _read_prediction(Path(path), allow_pickle)
    check_prediction(content, path, num_classes, image_size, require)
    return content


def _read_prediction(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not path.exists():
        raise ArtifactError(f"{path}: prediction file not found")
    if path.suffix == LEGACY_SUFFIX:
        if not allow_pickle:
            raise ArtifactError(
                f"{path}: a legacy .npy prediction is a pickled dict; pass --allow_pickle to import "
                "files from the original repository you trust"
            )
        try:
            content = np.load(path, allow_pickle=True).item()
            return {str(name): _to_numpy(value) for name, value in content.items()}
        except Exception as error:  # corrupt or not a dict: say which file
            raise ArtifactError(f"{path}: cannot read legacy prediction ({error})") from error
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:
        raise ArtifactError(f"{path}: cannot read prediction ({error})") from error
    return _decode_prediction(arrays, path)


def _decode_prediction(arrays: dict[str, np.ndarray], path: str | Path) -> dict[str, np.ndarray]:
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


def check_prediction(
    content: dict[str, np.ndarray],
    path: str | Path,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
    require: tuple[str, ...] = (),
) -> None:
    """Raise ``ArtifactError`` naming ``path`` unless the arrays form a valid prediction.

    ``keys`` ``(n + 1,)`` integer: 0 (background) first, then distinct class ids below ``num_classes``;
    every score array present (``cam``, ``hr_cam``, ``rw``) is ``(n, h, w)`` floating point and finite;
    ``rw_bg`` is ``(H, W)`` like ``rw``; with ``image_size`` ``(H, W)``, ``hr_cam`` and ``rw`` are
    ``(n, H, W)`` and the stride-4 ``cam`` is ``(n, ceil(H/4), ceil(W/4))``.
    """
    absent = [name for name in ("keys", *require) if name not in content]
    if absent:
        raise ArtifactError(f"{path}: no '{absent[0]}' array (has {sorted(content)})")
    keys = np.asarray(content["keys"])
    if keys.ndim != 1 or len(keys) == 0 or not np.issubdtype(keys.dtype, np.integer):
        raise ArtifactError(f"{path}: 'keys' must be a non-empty 1-D integer array, got {keys.dtype} {keys.shape}")
    classes = keys[1:]
    if keys[0] != 0 or (classes.size and (classes.min() < 1 or classes.max() >= num_classes)) \
            or len(np.unique(classes)) != len(classes):
        raise ArtifactError(f"{path}: keys {keys.tolist()} must be 0 then distinct class ids in 1..{num_classes - 1} "
                            f"(the dataset has {num_classes} classes)")
    expected = {"hr_cam": image_size, "rw": image_size,
                "cam": None if image_size is None else tuple(-(-side // CAM_STRIDE) for side in image_size)}
    for name, size in expected.items():
        if name in content:
            _check_scores(content[name], name, path, len(classes), size)
    if "rw_bg" in content:
        background = np.asarray(content["rw_bg"])
        _check_finite(background, "rw_bg", path)
        if "rw" not in content or background.shape != np.shape(content["rw"])[1:]:
            raise ArtifactError(f"{path}: 'rw_bg' {background.shape} must be the (H, W) of its 'rw' array")


def _check_scores(maps: np.ndarray, name: str, path: str | Path, channels: int, size: tuple[int, ...] | None) -> None:
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) != channels:
        raise ArtifactError(f"{path}: '{name}' {maps.shape} must be (n, H, W) with n = {channels} channels, "
                            f"one per class of its keys")
    if size is not None and maps.shape[1:] != tuple(size):
        raise ArtifactError(f"{path}: '{name}' is {maps.shape[1]}x{maps.shape[2]} but the image needs "
                            f"{size[0]}x{size[1]}")
    _check_finite(maps, name, path)


def _check_finite(values: np.ndarray, name: str, path: str | Path) -> None:
    if not np.issubdtype(values.dtype, np.floating):
        raise ArtifactError(f"{path}: '{name}' must hold floating-point scores, got {values.dtype}")
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ArtifactError(f"{path}: '{name}' has {bad} non-finite values (NaN or inf)")


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


def _to_numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


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


def pending_ids(directory: str | Path, ids: list[str], suffix: str, overwrite: bool, what: str) -> list[str]:
    """The ids still to compute in ``directory`` (all with ``overwrite``); says how many are done."""
    directory = Path(directory)
    todo = list(ids) if overwrite else [i for i in ids if not (directory / f"{i}{suffix}").exists()]
    LOG.info(f"{len(ids) - len(todo)} of {len(ids)} {what} already exist in {directory}")
    return todo


def missing_ids(directory: str | Path, ids: list[str], suffix: str) -> list[str]:
    """Ids that have no ``<id><suffix>`` in ``directory``; for ``CAM_SUFFIX`` a legacy ``.npy`` also counts."""
    directory = Path(directory)
    if suffix == CAM_SUFFIX:
        return [image_id for image_id in ids if not prediction_file(directory, image_id).exists()]
    return [image_id for image_id in ids if not (directory / f"{image_id}{suffix}").exists()]


def require_complete(directory: str | Path, ids: list[str], suffix: str, command: str) -> None:
    """Fail with the first id whose artifact is missing and the command that makes it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: folder not found; make it first with:\n  {command}")
    absent = missing_ids(directory, ids, suffix)
    if absent:
        raise ArtifactError(
            f"{directory}: {len(absent)} of {len(ids)} files missing, first '{absent[0]}{suffix}'; "
            f"make them with:\n  {command}"
        )


"""CAM and refined-map files: writing, reading (any format, checked) and their score maps.

A prediction file holds ``keys`` ``(n + 1,)`` (background 0, then the present classes' ids) and score
maps of those ``n`` classes: CAMs (``cam`` at stride 4, ``hr_cam`` at the photo's size) or refined maps
(``rw (n, H, W)`` and optionally a propagated background ``rw_bg (H, W)``). ``score_maps`` is the one
rule that picks the maps a file is scored and labelled by.

The refined-map contract, what every refinement method (the random walk, ``refine_crf.py``'s CAM + CRF)
writes with ``save_walk``: ``keys`` are the input CAM file's (the image's classes, background 0 first),
``rw`` holds one ``(H, W)`` score map per class of ``keys[1:]`` in that order at the photo's size, and
``rw_bg``, if present, is a background score on the same scale, compared with the class scores pixel by
pixel (without it, readers put a constant background threshold in front). Scores lie in
``[0, MAX_SCORE]`` of the compact codec.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.conventions import CAM_STRIDE
from tools.artifacts.codec import decode_prediction, encode_compact
from tools.artifacts.files import ArtifactError, atomic_write_bytes
from tools.artifacts.paths import LEGACY_SUFFIX

REFINED, RAW = "rw", "hr_cam"  # the score maps of a refinement (random walk, ...) and of CAMs
REFINED_BACKGROUND = "rw_bg"


def save_cams(path: str | Path, keys: np.ndarray, cam: np.ndarray, hr_cam: np.ndarray) -> None:
    """Write a CAM file in the compact format 2, atomically.

    ``keys`` ``(n + 1,)`` background 0 then the present class ids; ``cam`` ``(n, ceil(H/4), ceil(W/4))``
    and ``hr_cam`` ``(n, H, W)`` scores in ``[0, MAX_SCORE]`` (max-normalised CAMs).
    """
    atomic_write_bytes(path, encode_compact(keys, {"cam": cam, "hr_cam": hr_cam}, str(path)))


def save_walk(path: str | Path, keys: np.ndarray, rw: np.ndarray, rw_bg: np.ndarray | None = None) -> None:
    """Write a random-walk file in the compact format 2, atomically.

    ``keys`` ``(n + 1,)`` as in ``save_cams``; ``rw`` ``(n, H, W)`` and the propagated background
    ``rw_bg`` ``(H, W)`` (if any) scores in ``[0, MAX_SCORE]`` (normalised to a maximum of 1).
    """
    scores = {REFINED: rw} if rw_bg is None else {REFINED: rw, REFINED_BACKGROUND: rw_bg}
    atomic_write_bytes(path, encode_compact(keys, scores, str(path)))


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
    return decode_prediction(arrays, path)



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
    expected = {RAW: image_size, REFINED: image_size,
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



def _to_numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)




@dataclass(frozen=True)
class ScoreMaps:
    """What a prediction file is scored and labelled by: ``keys (n + 1,)``, class scores ``(n, H, W)`` and a
    propagated background ``(H, W)`` (None: a background threshold stands in for it)."""

    keys: np.ndarray
    scores: np.ndarray
    background: np.ndarray | None


def score_maps(content: dict[str, np.ndarray], path: str | Path, array: str | None = None) -> ScoreMaps:
    """The score maps of a loaded prediction: the refined ``rw`` (with ``rw_bg`` if present) when the file has
    them, else the CAMs' ``hr_cam``; ``array`` (``rw`` or ``hr_cam``) insists on one. This is the contract
    every refinement method writes to and every reader (pseudo labels, evaluation, report) goes through."""
    name = array or (REFINED if REFINED in content else RAW)
    if name not in content:
        raise ArtifactError(f"{path}: no '{name}' array (has {sorted(content)})")
    background = content.get(REFINED_BACKGROUND) if name == REFINED else None
    return ScoreMaps(np.asarray(content["keys"]).astype(np.int64), np.asarray(content[name]), background)

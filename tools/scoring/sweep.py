"""Confusion stacks of a whole background-threshold sweep at the cost of a single threshold.

At threshold ``th`` the label of a pixel is its best class map (local index ``c`` in ``1..n``, ties to
the lower index) if that map's score ``m`` is above ``th``, else background 0
(:func:`tools.evaluation.threshold_labels`). ``c`` and ``m`` do not depend on ``th``, so one
*survival score* per pixel decides every threshold: the pixel is ``c`` exactly at the thresholds
strictly below it. Without erosion the survival score is ``m``. With the 7x7 erosion of
:func:`tools.metrics.erode_labels` a pixel keeps ``c`` iff every pixel of its window, clipped at the
image border, has best class ``c`` and a score above ``th``: the survival score is the window's
minimum of ``m`` where the window's best class is constant, and the pixel is always background
elsewhere.

The rank ``k`` of a pixel (how many of the sorted thresholds lie strictly below its survival score)
then says that it is foreground at the ``k`` lowest thresholds; one histogram over (k, GT, c) and a
cumulative sum over ``k`` give all confusion matrices.
"""
from __future__ import annotations

import cv2
import numpy as np

from tools.scoring.metrics import EROSION_KERNEL

# A replicated border makes the 7x7 min / max filters run over the window clipped at the image
# border, which is what erode_labels' default border (255 outside a 0/1 mask) does. cv2's default
# border for float maps is +-FLT_MAX, which would turn a +inf score near the border into FLT_MAX.
FILTER_BORDER = cv2.BORDER_REPLICATE
FILTER_DTYPES = (np.float32, np.float64)  # score dtypes cv2's min filter takes as they are


def sweep_confusions(
    gt: np.ndarray,
    maps: np.ndarray,
    keys: np.ndarray,
    thresholds: tuple[float, ...],
    num_classes: int,
    ignore_index: int,
    erode: bool,
) -> np.ndarray:
    """Confusion counts ``(T, C, C + 1)`` of one image at every background threshold.

    Equals ``confusion_stack(gt, keys[labels], num_classes, ignore_index)`` with ``labels`` the
    ``(T, H, W)`` maps of ``threshold_labels(maps, thresholds)``, each passed through
    ``erode_labels`` when ``erode``, for any order of ``thresholds`` (duplicates allowed), but costs
    one threshold's work: the thresholds only enter through a sort and a cumulative sum.

    Args:
        gt: ``(H, W)`` ground-truth classes in ``0..C-1``, or ``ignore_index`` (skipped).
        maps: ``(n, H, W)`` score maps of the image's classes, ``n >= 0``, without NaN.
        keys: ``(n + 1,)`` dataset class of each local index, background first.
        thresholds: ``T`` background thresholds, compared in ``maps``' dtype.
        num_classes: ``C``.
        ignore_index: GT value to skip; a key equal to it counts as abstained (column ``C``).
        erode: apply the original's 7x7 erosion post-process.

    Raises:
        ValueError: on mismatched shapes, or GT / predicted classes outside ``0..C-1`` and
            ``ignore_index`` (as ``confusion_stack``).
    """
    gt = np.asarray(gt)
    maps = np.asarray(maps)
    keys = np.asarray(keys).reshape(-1)
    if maps.ndim != 3 or maps.shape[1:] != gt.shape:
        raise ValueError(f"prediction shape {maps.shape[1:]} differs from the GT shape {gt.shape}")
    if len(keys) != len(maps) + 1:
        raise ValueError(f"{len(keys)} keys for {len(maps)} score maps (expected one more, the background)")
    levels, order = np.unique(np.asarray(thresholds, dtype=maps.dtype), return_inverse=True)
    local, ranks = survival_ranks(maps, levels, erode)
    counts = local_confusions(gt, local, ranks, len(levels), len(keys), num_classes, ignore_index)
    return _to_classes(counts, keys, num_classes, ignore_index)[order]


def survival_ranks(maps: np.ndarray, levels: np.ndarray, erode: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best local index ``c`` ``(H, W)`` and rank ``k`` ``(H, W)`` of every pixel of ``maps`` ``(n, H, W)``.

    ``k`` counts the sorted, unique ``levels`` ``(U,)`` strictly below the pixel's survival score:
    the pixel is labelled ``c`` at the ``k`` lowest levels and background at the others.
    """
    height, width = maps.shape[1:]
    if maps.size == 0:  # no class maps (all background) or an empty image
        zeros = np.zeros((height, width), dtype=np.int64)
        return zeros, zeros
    best_score = maps.max(axis=0)
    best_index = maps.argmax(axis=0) + 1
    if not erode:
        return best_index, np.searchsorted(levels, best_score)
    window_score, constant = _window_survival(best_score, best_index)
    return best_index, np.where(constant, np.searchsorted(levels, window_score), 0)


def _window_survival(best_score: np.ndarray, best_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum score over each pixel's 7x7 window and whether the window's best class is constant."""
    index = best_index.astype(np.min_scalar_type(best_index.max()))
    constant = cv2.erode(index, EROSION_KERNEL, borderType=FILTER_BORDER) == cv2.dilate(
        index, EROSION_KERNEL, borderType=FILTER_BORDER
    )
    if best_score.dtype not in FILTER_DTYPES:  # e.g. float16: widening keeps order and values exact
        best_score = best_score.astype(np.float64)
    return cv2.erode(best_score, EROSION_KERNEL, borderType=FILTER_BORDER), constant


def local_confusions(
    gt: np.ndarray,
    local: np.ndarray,
    ranks: np.ndarray,
    num_levels: int,
    num_local: int,
    num_classes: int,
    ignore_index: int,
) -> np.ndarray:
    """Counts ``(U, C, n + 1)`` of GT class against predicted local index at each of ``U`` levels.

    ``local`` ``(H, W)`` holds indices ``0..n`` (``num_local = n + 1``) and ``ranks`` ``(H, W)``
    values ``0..U``, as :func:`survival_ranks` returns them; GT pixels equal to ``ignore_index``
    are skipped.
    """
    valid = gt != ignore_index
    gt_valid = gt[valid].astype(np.int64)
    if gt_valid.size and (gt_valid.min() < 0 or gt_valid.max() >= num_classes):
        bad = gt_valid[(gt_valid < 0) | (gt_valid >= num_classes)][0]
        raise ValueError(f"GT holds class {bad}, outside 0..{num_classes - 1} and ignore {ignore_index}")
    flat = (ranks[valid] * num_classes + gt_valid) * num_local + local[valid]
    counts = np.bincount(flat, minlength=(num_levels + 1) * num_classes * num_local)
    counts = counts.reshape(num_levels + 1, num_classes, num_local)
    background = np.cumsum(counts, axis=0)[:-1]  # rank <= level: background at that level
    stack = counts.sum(axis=0) - background  # rank > level: the pixel's own class
    stack[..., 0] += background.sum(axis=2)
    return stack


def _to_classes(counts: np.ndarray, keys: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Local-index counts ``(U, C, n + 1)`` -> class counts ``(U, C, C + 1)`` via ``keys`` ``(n + 1,)``."""
    keys = keys.astype(np.int64)
    columns = np.where(keys == ignore_index, num_classes, keys)
    used = counts.any(axis=(0, 1))
    bad = used & ((columns < 0) | (columns > num_classes))
    if bad.any():
        raise ValueError(
            f"prediction holds class {keys[bad][0]}, outside 0..{num_classes - 1} and ignore {ignore_index}"
        )
    one_hot = np.zeros((len(keys), num_classes + 1), dtype=np.int64)
    one_hot[np.flatnonzero(used), columns[used]] = 1
    return counts @ one_hot

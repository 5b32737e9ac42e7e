"""Segmentation scores of the original's ``evaluate.py``: confusion counts, IoU, FP, FN, erosion.

Counts are kept as confusion matrices of shape ``(C, C + 1)``: rows are ground-truth classes,
columns ``0..C-1`` predicted classes and column ``C`` "abstained" (the prediction holds the ignore
value 255, as pseudo labels do). Pixels whose ground truth is 255 are skipped. With
``T`` = GT count, ``P`` = predicted count and ``TP`` = correct count of a class::

    IoU_c = TP / (T + P - TP + 1e-10)       FP_c = (P - TP) / (T + P - TP + 1e-10)
    mIoU  = 100 * mean_c IoU_c              FN_c = (T - TP) / (T + P - TP + 1e-10)

A class that appears neither in the ground truth nor in the prediction (``T + P = 0``) has no
defined IoU (NaN per class). The means count it as 0 by default, as the original does
(``mean_over="all"``: the mean is over every class of the descriptor), or leave it out
(``"present"``); the two differ only on lists that miss some classes. Many thresholds are scored at once by stacking matrices:
``(num_thresholds, C, C + 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from core.conventions import IGNORE_INDEX

EPSILON = 1e-10
EROSION_KERNEL = np.ones((7, 7), dtype=np.uint8)
MEAN_OVER = ("all", "present")


def confusion_stack(
    gt: np.ndarray, predictions: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Confusion counts of one GT map ``(H, W)`` against predictions ``(T, H, W)`` -> ``(T, C, C + 1)``.

    Prediction values equal to ``ignore_index`` count as abstained; any other value outside
    ``0..C-1``, in the prediction or in the GT, is a ``ValueError``.
    """
    gt = np.asarray(gt)
    predictions = np.asarray(predictions)
    if predictions.ndim != 3 or predictions.shape[1:] != gt.shape:
        raise ValueError(f"prediction shape {predictions.shape[1:]} differs from the GT shape {gt.shape}")
    valid = gt != ignore_index
    gt_valid = gt[valid].astype(np.int64)
    predicted = predictions[:, valid].astype(np.int64)
    if gt_valid.size and (gt_valid.min() < 0 or gt_valid.max() >= num_classes):
        bad = gt_valid[(gt_valid < 0) | (gt_valid >= num_classes)][0]
        raise ValueError(f"GT holds class {bad}, outside 0..{num_classes - 1} and ignore {ignore_index}")
    predicted[predicted == ignore_index] = num_classes
    if predicted.size and (predicted.min() < 0 or predicted.max() > num_classes):
        bad = predicted[(predicted < 0) | (predicted > num_classes)][0]
        raise ValueError(
            f"prediction holds class {bad}, outside 0..{num_classes - 1} and ignore {ignore_index}"
        )
    columns = num_classes + 1
    offsets = np.arange(len(predictions), dtype=np.int64)[:, None] * (num_classes * columns)
    flat = offsets + gt_valid[None, :] * columns + predicted
    counts = np.bincount(flat.ravel(), minlength=len(predictions) * num_classes * columns)
    return counts.reshape(len(predictions), num_classes, columns)


@dataclass(frozen=True)
class SegmentationScores:
    """Per-class IoU, FP and FN fractions ``(C,)``; NaN for classes absent from GT and prediction,
    which the means count as 0 (``mean_over="all"``, the original) or leave out (``"present"``)."""

    iou: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    mean_over: str = "all"

    def __post_init__(self) -> None:
        if self.mean_over not in MEAN_OVER:
            raise ValueError(f"mean_over must be one of {MEAN_OVER}, got {self.mean_over!r}")

    def _mean(self, values: np.ndarray) -> float:
        if self.mean_over == "all":
            return float(np.nan_to_num(values, nan=0.0).mean()) if values.size else 0.0
        defined = values[~np.isnan(values)]
        return float(defined.mean()) if defined.size else 0.0

    @property
    def miou(self) -> float:
        """Mean IoU over the classes, in percent."""
        return 100.0 * self._mean(self.iou)

    @property
    def miou_foreground(self) -> float:
        """Mean IoU over the classes after the background (index 0), in percent."""
        return 100.0 * self._mean(self.iou[1:])

    @property
    def fp_all(self) -> float:
        return self._mean(self.fp)

    @property
    def fn_all(self) -> float:
        return self._mean(self.fn)


def scores_from_confusion(matrix: np.ndarray, mean_over: str = "all") -> SegmentationScores:
    """IoU / FP / FN of a ``(C, C + 1)`` confusion matrix (the last column: abstained pixels)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    num_classes = matrix.shape[0]
    if matrix.shape != (num_classes, num_classes + 1):
        raise ValueError(f"confusion matrix must be (C, C + 1), got {matrix.shape}")
    true_positive = np.diagonal(matrix[:, :num_classes])
    gt_count = matrix.sum(axis=1)
    predicted_count = matrix[:, :num_classes].sum(axis=0)
    union = gt_count + predicted_count - true_positive
    present = (gt_count + predicted_count) > 0
    with np.errstate(invalid="ignore"):
        iou = np.where(present, true_positive / (union + EPSILON), np.nan)
        fp = np.where(present, (predicted_count - true_positive) / (union + EPSILON), np.nan)
        fn = np.where(present, (gt_count - true_positive) / (union + EPSILON), np.nan)
    return SegmentationScores(iou=iou, fp=fp, fn=fn, mean_over=mean_over)


class ConfusionAccumulator:
    """Sums confusion counts over images for ``num_thresholds`` predictions per image at once."""

    def __init__(self, num_classes: int, num_thresholds: int = 1, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_thresholds, num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, predictions: np.ndarray) -> None:
        """Add one image: ``gt (H, W)`` against ``predictions (T, H, W)`` (or ``(H, W)`` when T = 1)."""
        predictions = np.asarray(predictions)
        if predictions.ndim == 2:
            predictions = predictions[None]
        self.add(confusion_stack(gt, predictions, self.num_classes, self.ignore_index))

    def add(self, stack: np.ndarray) -> None:
        """Add precomputed counts ``(T, C, C + 1)`` (e.g. from a worker process)."""
        if stack.shape != self.matrix.shape:
            raise ValueError(f"confusion stack {stack.shape} does not match the accumulator's {self.matrix.shape}")
        self.matrix += stack

    def scores(self, mean_over: str = "all") -> list[SegmentationScores]:
        """One :class:`SegmentationScores` per threshold."""
        return [scores_from_confusion(matrix, mean_over) for matrix in self.matrix]


def erode_labels(labels: np.ndarray) -> np.ndarray:
    """The original's ``post_process``: shrink every region of a ``(H, W)`` label map by 3 px.

    Each label present is eroded on its own with a 7x7 ones kernel (one iteration, default border,
    so the image border does not erode); the surviving maps are disjoint and stacked, and the argmax
    over the stack keeps each survivor's label. Pixels that every map lost become 0.
    """
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError(f"label maps hold non-negative indices, got {labels.min()}")
    eroded = np.zeros_like(labels)
    for label in np.flatnonzero(np.bincount(labels.ravel())):
        region = cv2.erode((labels == label).view(np.uint8), EROSION_KERNEL, iterations=1)
        np.copyto(eroded, label, where=region.view(bool))
    return eroded

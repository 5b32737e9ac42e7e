"""Score CAMs, random-walk maps or label PNGs against ground-truth masks (``evaluate.py``'s logic).

Per image and threshold (``npy`` / ``rw`` modes): a constant plane equal to the threshold is put
in front of the class maps as channel 0 and the argmax taken (ties go to the lower index, so a
score equal to the threshold is background); then either the label CRF (``crf_iteration > 0``)
or the 7x7 erosion post-process runs on the local indices, and ``keys[index]`` gives the classes.
Without the CRF the whole sweep is counted in one pass (``tools.scoring.sweep``: each pixel's "survival
score" decides its label at every threshold), with results equal to the per-threshold path. Every
prediction file is read once, by parallel worker processes, each returning a ``(T, C, C + 1)``
confusion stack.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from core.conventions import IGNORE_INDEX
from tools.artifacts.files import ArtifactError, atomic_write_bytes, atomic_write_text, load_label_png
from tools.artifacts.paths import LEGACY_SUFFIX, PNG_SUFFIX, prediction_file
from tools.artifacts.predictions import REFINED, ScoreMaps, load_prediction, score_maps
from tools.data.descriptor import DatasetError, load_descriptor
from tools.data.readers import make_reader
from tools.data.voc import VOCReader
from tools.scoring.crf import crf_inference_label
from tools.scoring.labels import threshold_argmax
from tools.scoring.metrics import ConfusionAccumulator, SegmentationScores, confusion_stack, erode_labels
from tools.scoring.parallel import parallel_map
from tools.scoring.sweep import sweep_confusions

MODES = ("npy", "png", "rw")
SWEEP = (0.10, 0.40, 0.01)  # min, max (inclusive), step: the original's 31 background thresholds
POST_PROCESSES = ("erode", "none")
THRESHOLD_DECIMALS = 10  # sweep values are rounded so that 0.1 + 15 * 0.01 is exactly 0.25


@dataclass(frozen=True)
class EvaluationConfig:
    """What to score and how. ``thresholds`` is empty in ``png`` mode."""

    pred_dir: Path
    gt_dir: Path
    mode: str
    thresholds: tuple[float, ...]
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    crf_iteration: int = 0
    post_process: str = "erode"
    dataset: Path | None = None  # descriptor and root whose reader finds the photos (the CRF needs them)
    data_dir: Path | None = None
    allow_pickle: bool = False
    mean_over: str = "all"

    @property
    def num_predictions(self) -> int:
        """Confusion matrices per image: one per threshold (one in ``png`` mode)."""
        return max(len(self.thresholds), 1)

    def prediction_path(self, image_id: str) -> Path:
        if self.mode == "png":
            return self.pred_dir / f"{image_id}{PNG_SUFFIX}"
        return prediction_file(self.pred_dir, image_id)

    def gt_path(self, image_id: str) -> Path:
        return self.gt_dir / f"{image_id}{PNG_SUFFIX}"

    def image_path(self, image_id: str) -> Path:
        if self.dataset is None:
            raise ValueError("the CRF needs the photos: the dataset is not set")
        return _reader(self.dataset, self.data_dir).image_path(image_id)


@cache
def _reader(dataset: Path, data_dir: Path | None) -> VOCReader:
    """The dataset's reader, made once per (worker) process: a VOC folder or a COCO index."""
    return make_reader(load_descriptor(dataset), data_dir)


def sweep_thresholds(min_threshold: float, max_threshold: float, step: float) -> tuple[float, ...]:
    """``min, min + step, ..., max`` inclusive (0.10..0.40 by 0.01 gives the original's 31 values)."""
    if step <= 0:
        raise ValueError(f"--step must be positive, got {step}")
    if max_threshold < min_threshold:
        raise ValueError(f"--max_th {max_threshold} is below --min_th {min_threshold}")
    count = math.floor((max_threshold - min_threshold) / step + 1e-6) + 1
    values = min_threshold + step * np.arange(count)
    return tuple(float(value) for value in np.round(values, THRESHOLD_DECIMALS))


def check_inputs(config: EvaluationConfig, ids: list[str]) -> None:
    """Fail before any work if a prediction, GT mask or (for the CRF) photo is missing."""
    if not ids:
        raise DatasetError("no image ids to evaluate")
    missing = [image_id for image_id in ids if not config.prediction_path(image_id).exists()]
    if missing:
        raise ArtifactError(
            f"{config.pred_dir}: {len(missing)} of {len(ids)} predictions are missing; first missing id "
            f"'{missing[0]}' ({config.prediction_path(missing[0]).name})"
        )
    if not config.allow_pickle and config.mode != "png":
        paths = (config.prediction_path(image_id) for image_id in ids)
        legacy = next((path for path in paths if path.suffix == LEGACY_SUFFIX), None)
        if legacy is not None:
            raise ArtifactError(
                f"{legacy}: a legacy .npy prediction is a pickled dict; pass --allow_pickle to import "
                "files from the original repository you trust"
            )
    for image_id in ids:
        if not config.gt_path(image_id).is_file():
            raise DatasetError(
                f"{config.gt_path(image_id)}: GT mask of id '{image_id}' is missing (check --gt_dir)"
            )
    if config.mode != "png" and config.crf_iteration > 0:
        for image_id in ids:
            if not config.image_path(image_id).is_file():
                raise DatasetError(
                    f"{config.image_path(image_id)}: photo of id '{image_id}' (for the CRF) is missing"
                )


def threshold_labels(scores: np.ndarray, thresholds: tuple[float, ...]) -> np.ndarray:
    """Local indices ``(T, H, W)`` of class maps ``(n, H, W)`` behind a background plane per threshold.

    Equals ``argmax(concat([full(threshold), scores]))`` with the threshold cast to the maps' dtype
    (as ``np.pad`` does in the original), computed once for all thresholds.
    """
    height, width = scores.shape[1:]
    if len(scores) == 0:
        return np.zeros((len(thresholds), height, width), dtype=np.int64)
    best_score = scores.max(axis=0)
    best_index = scores.argmax(axis=0) + 1
    levels = np.asarray(thresholds, dtype=scores.dtype)[:, None, None]
    return np.where(best_score[None] > levels, best_index[None], 0).astype(np.int64)


def _prediction_maps(config: EvaluationConfig, path: Path, image_size: tuple[int, int]) -> ScoreMaps:
    """The file's score maps (``tools.artifacts.predictions.score_maps``; ``rw`` mode insists on the walk's)."""
    content = load_prediction(path, config.num_classes, allow_pickle=config.allow_pickle, image_size=image_size)
    return score_maps(content, path, REFINED if config.mode == "rw" else None)


def predict_labels(config: EvaluationConfig, image_id: str, keys: np.ndarray, maps: np.ndarray,
                   background: np.ndarray | None) -> np.ndarray:
    """Class maps ``(T, H, W)`` of one image, one per threshold, from its ``keys (n+1,)``, class maps
    ``(n, H, W)`` and propagated background ``(H, W)`` (None: the threshold is the background)."""
    if background is None:
        local = threshold_labels(maps, config.thresholds)
    else:  # a random walk with a propagated background channel needs no threshold
        local = np.repeat(threshold_argmax(maps, background)[None], len(config.thresholds), axis=0)
    if config.crf_iteration > 0:
        image = _load_photo(config.image_path(image_id))
        if image.shape[:2] != maps.shape[1:]:
            raise ArtifactError(
                f"{config.prediction_path(image_id)}: prediction size {maps.shape[1:]} differs from the photo "
                f"{config.image_path(image_id)} {image.shape[:2]}"
            )
        local = np.stack(
            [crf_inference_label(image, labels, len(keys), t=config.crf_iteration) for labels in local]
        )
    elif config.post_process == "erode":
        local = np.stack([erode_labels(labels) for labels in local])
    return keys[local]


def score_image(config: EvaluationConfig, image_id: str) -> np.ndarray:
    """Confusion stack ``(T, C, C + 1)`` of one image (the worker function).

    A threshold sweep without CRF is counted by ``tools.scoring.sweep`` in one pass for all thresholds (equal
    to the per-threshold computation of ``predict_labels``, which a CRF or a propagated background
    needs).
    """
    gt = load_label_png(config.gt_path(image_id))
    if config.mode == "png":
        predictions = load_label_png(config.prediction_path(image_id))[None]
        if predictions.shape[1:] != gt.shape:
            raise ArtifactError(f"{config.prediction_path(image_id)}: prediction size {predictions.shape[1:]} "
                                f"differs from the GT mask {config.gt_path(image_id)} {gt.shape}")
        return _confusions(confusion_stack, config, image_id, gt, predictions, config.num_classes,
                           config.ignore_index)
    maps = _prediction_maps(config, config.prediction_path(image_id), gt.shape)
    keys, background = maps.keys, maps.background
    maps = maps.scores
    if config.crf_iteration == 0 and background is None:
        return _confusions(sweep_confusions, config, image_id, gt, maps, keys, config.thresholds,
                           config.num_classes, config.ignore_index, config.post_process == "erode")
    predictions = predict_labels(config, image_id, keys, maps, background)
    return _confusions(confusion_stack, config, image_id, gt, predictions, config.num_classes, config.ignore_index)


def _confusions(count: Callable[..., np.ndarray], config: EvaluationConfig, image_id: str, gt: np.ndarray,
                *args: object) -> np.ndarray:
    """``count(gt, *args)``, a bad class value in the GT or the prediction named with both files."""
    try:
        return count(gt, *args)
    except ValueError as error:
        raise ArtifactError(f"{config.gt_path(image_id)} / {config.prediction_path(image_id)}: {error}") from error


def evaluate(config: EvaluationConfig, ids: list[str], n_jobs: int = 1) -> list[SegmentationScores]:
    """Scores over all ``ids``, one :class:`SegmentationScores` per threshold."""
    check_inputs(config, ids)
    accumulator = ConfusionAccumulator(config.num_classes, config.num_predictions, config.ignore_index)
    for stack in parallel_map(partial(score_image, config), ids, n_jobs, desc=f"evaluate ({config.mode})"):
        accumulator.add(stack)
    return accumulator.scores(config.mean_over)


# ----------------------------------------------------------------------------- reporting
def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def summarise(
    scores: list[SegmentationScores], thresholds: tuple[float, ...], class_names: tuple[str, ...]
) -> dict:
    """JSON-ready results: one entry per threshold (IoU in percent, FP/FN fractions) and the best.

    The best is the first threshold with the highest mIoU, as in the original. Classes absent from
    both GT and predictions have IoU/FP/FN ``None``.
    """
    entries = []
    for threshold, score in zip(thresholds or (None,), scores):
        entries.append(
            {
                "threshold": threshold,
                "miou": score.miou,
                "miou_foreground": score.miou_foreground,
                "fp": score.fp_all,
                "fn": score.fn_all,
                "iou": {name: _finite(100.0 * value) for name, value in zip(class_names, score.iou)},
                "fp_per_class": {name: _finite(value) for name, value in zip(class_names, score.fp)},
                "fn_per_class": {name: _finite(value) for name, value in zip(class_names, score.fn)},
            }
        )
    best = max(range(len(entries)), key=lambda index: (entries[index]["miou"], -index))
    return {"results": entries, "best": entries[best]}


def _threshold_text(threshold: float | None) -> str:
    return "-" if threshold is None else f"{threshold:.2f}"


def format_report(result: dict) -> str:
    """Per-class IoU table of the best threshold, one line per threshold, and the best threshold."""
    best = result["best"]
    width = max(len(name) for name in best["iou"])
    lines = [f"per-class IoU (%) at threshold {_threshold_text(best['threshold'])}:"]
    for name, iou in best["iou"].items():
        lines.append(f"  {name:<{width}}  {'-' if iou is None else f'{iou:6.2f}'}")
    lines.append("")
    for entry in result["results"]:
        lines.append(
            f"Th={_threshold_text(entry['threshold'])}, mIoU={entry['miou']:.3f}%, "
            f"FP={entry['fp']:.4f}, FN={entry['fn']:.4f}"
        )
    lines.append(
        f"best: Th={_threshold_text(best['threshold'])}, mIoU={best['miou']:.3f}%, "
        f"FP={best['fp']:.4f}, FN={best['fn']:.4f}"
    )
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def plot_sweep(result: dict, path: Path) -> None:
    """PNG of mIoU (left axis) and FP / FN (right axis) against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    entries = result["results"]
    x = [entry["threshold"] if entry["threshold"] is not None else 0.0 for entry in entries]
    figure, miou_axis = pyplot.subplots(figsize=(7, 4))
    miou_axis.plot(x, [entry["miou"] for entry in entries], "o-", color="tab:blue", label="mIoU")
    miou_axis.set_xlabel("background threshold")
    miou_axis.set_ylabel("mIoU (%)")
    rate_axis = miou_axis.twinx()
    rate_axis.plot(x, [entry["fp"] for entry in entries], "s--", color="tab:red", label="FP")
    rate_axis.plot(x, [entry["fn"] for entry in entries], "^--", color="tab:green", label="FN")
    rate_axis.set_ylabel("FP / FN")
    handles = miou_axis.get_legend_handles_labels()[0] + rate_axis.get_legend_handles_labels()[0]
    miou_axis.legend(handles, [handle.get_label() for handle in handles], loc="best")
    best = result["best"]
    miou_axis.set_title(f"best: Th={_threshold_text(best['threshold'])}, mIoU={best['miou']:.2f}%")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _load_photo(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:
        raise DatasetError(f"{path}: unreadable photo ({error})") from error

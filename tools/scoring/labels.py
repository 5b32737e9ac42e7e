"""From per-class score maps to label maps: the background-threshold argmax, affinity labels and
segmentation outputs.

Score maps are CAMs (``hr_cam``) or random-walk results (``rw``) of the present classes only,
``(n, H, W)``; ``keys`` ``(n + 1,)`` maps local channel indices to dataset class ids, with the
background 0 first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.conventions import IGNORE_INDEX
from tools.artifacts.files import save_png
from tools.artifacts.paths import prediction_file
from tools.artifacts.predictions import load_prediction
from tools.data.voc import VOCReader
from tools.scoring.crf import CRFSetting, crf_inference, crf_inference_label

AFFINITY_CRF_ITERATIONS = 10
UNCERTAIN = IGNORE_INDEX  # affinity labels: the pair is not trained on


def threshold_argmax(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Local label map ``(H, W)`` int64: prepend a background plane, take the argmax.

    The plane is the constant ``threshold``, or a ``(H, W)`` background score (a random walk that
    propagated a background channel). Ties go to the lower index, so a score equal to the
    threshold is background.
    """
    scores = np.asarray(scores, dtype=np.float32)
    background = np.broadcast_to(np.asarray(threshold, dtype=np.float32), scores.shape[1:])[None]
    return np.argmax(np.concatenate([background, scores]), axis=0)


def scores_to_label(
    scores: np.ndarray,
    keys: np.ndarray,
    threshold: float | np.ndarray,
    image: np.ndarray | None = None,
    crf_iteration: int = 0,
) -> np.ndarray:
    """Class label map ``(H, W)`` uint8: threshold argmax, optional label CRF on the RGB ``image``, keys."""
    local = threshold_argmax(scores, threshold)
    if crf_iteration > 0:
        if image is None:
            raise ValueError("the CRF needs the RGB image")
        local = crf_inference_label(image, local, n_labels=len(keys), t=crf_iteration)
    return np.asarray(keys)[local].astype(np.uint8)


def affinity_label(
    image: np.ndarray,
    hr_cam: np.ndarray,
    keys: np.ndarray,
    fg_threshold: float,
    bg_threshold: float,
    crf_iteration: int = AFFINITY_CRF_ITERATIONS,
) -> np.ndarray:
    """Affinity-label map ``(H, W)`` uint8 of the original ``make_affinity_labels.py``.

    Two CRF-refined label maps, one thresholded at ``fg_threshold`` and one at ``bg_threshold``.
    The result keeps the fg map's class where it says foreground, 0 where both say background and
    255 (uncertain) where only the bg map says foreground. With the paper's fg 0.11 < bg 0.15 the
    uncertain band comes only from the two CRFs disagreeing (a quirk kept on purpose).
    """
    fg = scores_to_label(hr_cam, keys, fg_threshold, image, crf_iteration)
    bg = scores_to_label(hr_cam, keys, bg_threshold, image, crf_iteration)
    label = fg.copy()
    label[fg == 0] = UNCERTAIN
    label[(fg == 0) & (bg == 0)] = 0
    return label


def segmentation_label(probs: np.ndarray, image: np.ndarray | None = None, crf: CRFSetting | None = None) -> np.ndarray:
    """Class label map ``(H, W)`` uint8 of probabilities ``(K, H, W)``: argmax, after a dense CRF on the
    RGB ``image`` if ``crf`` is given."""
    if crf is not None:
        if image is None:
            raise ValueError("the CRF needs the RGB image")
        probs = crf_inference(image, probs, crf.iterations, kernels=crf.kernels)
    return np.argmax(probs, axis=0).astype(np.uint8)


def write_segmentation_png(
    path: str | Path, probs: np.ndarray, image: np.ndarray | None, crf: CRFSetting | None, palette: np.ndarray
) -> None:
    """``segmentation_label`` written as a palette PNG (a picklable job for worker processes)."""
    save_png(path, segmentation_label(probs, image, crf), palette)


def photo_and_cams(reader: VOCReader, cam_dir: Path, image_id: str, num_classes: int,
                   allow_pickle: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The RGB photo ``(H, W, 3)`` of an id and its checked CAM file (``hr_cam`` of the photo's size), as the
    stages that refine CAMs on the photo (affinity labels, the CRF refinement) read them."""
    image = np.array(reader.load_image(image_id))
    cams = load_prediction(prediction_file(cam_dir, image_id), num_classes, allow_pickle=allow_pickle,
                           image_size=image.shape[:2], require=("hr_cam",))
    return image, cams

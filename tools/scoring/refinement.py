"""CAM refinement by a dense CRF on the photo: class scores plus a background score, as probabilities.

The CAMs' ``hr_cam`` ``(n, H, W)`` (max-normalised, in ``[0, 1]``) get a background plane
``(1 - max_c cam)^bg_power`` in front (PSA's ``_crf_with_alpha``); the ``n + 1`` planes are divided by their
per-pixel sum (no softmax) and refined by ``tools.scoring.crf.crf_inference``. The CRF's marginals are the
refined maps: background ``(H, W)`` and classes ``(n, H, W)``, written as ``rw_bg`` and ``rw``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.scoring.crf import CRFKernels, crf_inference

PROBABILITY_EPSILON = 1e-5  # keeps a pixel where every plane is 0 a uniform distribution, not 0/0


@dataclass(frozen=True)
class RefinedMaps:
    """The refined score maps of one image: classes ``(n, H, W)`` and background ``(H, W)``, float32 in [0, 1]."""

    scores: np.ndarray
    background: np.ndarray


def background_score(hr_cam: np.ndarray, power: float) -> np.ndarray:
    """``(1 - max_c cam)^power`` ``(H, W)`` of CAMs ``(n, H, W)`` (clipped to [0, 1]; all 1 when n = 0)."""
    cams = np.clip(np.asarray(hr_cam, dtype=np.float32), 0.0, 1.0)
    strongest = cams.max(axis=0) if len(cams) else np.zeros(cams.shape[1:], np.float32)
    return np.power(1.0 - strongest, power, dtype=np.float32)


def cam_probabilities(hr_cam: np.ndarray, bg_power: float) -> np.ndarray:
    """Background then class planes ``(n + 1, H, W)`` of CAMs ``(n, H, W)``, normalised to sum 1 per pixel."""
    planes = np.concatenate([background_score(hr_cam, bg_power)[None],
                             np.clip(np.asarray(hr_cam, dtype=np.float32), 0.0, 1.0)])
    planes += PROBABILITY_EPSILON
    return planes / planes.sum(axis=0, keepdims=True)


def crf_refine(image: np.ndarray, hr_cam: np.ndarray, bg_power: float, iterations: int,
               kernels: CRFKernels) -> RefinedMaps:
    """CAMs ``(n, H, W)`` refined by ``iterations`` mean-field steps of the dense CRF on the RGB uint8 photo
    ``(H, W, 3)``: the marginals of the classes and of the background."""
    probabilities = cam_probabilities(hr_cam, bg_power)
    if len(probabilities) == 1:  # no class: the background is certain, nothing to refine
        return RefinedMaps(np.zeros((0, *probabilities.shape[1:]), np.float32), np.ones(probabilities.shape[1:],
                                                                                          np.float32))
    marginals = crf_inference(image, probabilities, iterations, kernels=kernels)
    return RefinedMaps(marginals[1:], marginals[0])

"""Fully connected CRF (pydensecrf) refinement with the original's settings.

``crf_inference_label`` refines a hard label map (evaluation, affinity labels, pseudo labels);
``crf_inference`` refines class probabilities (segmentation inference), with the original's kernels
or DeepLab's (``CRFKernels``). pydensecrf is imported only when a CRF runs, so the rest of the
pipeline works without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

LABEL_GAUSSIAN_SXY, LABEL_GAUSSIAN_COMPAT = 3, 3
LABEL_BILATERAL_SXY, LABEL_BILATERAL_SRGB, LABEL_BILATERAL_COMPAT = 50, 5, 10


@dataclass(frozen=True)
class CRFKernels:
    """Pairwise terms of the probability CRF: Gaussian (position) and bilateral (position + colour)."""

    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float


ORIGINAL_KERNELS = CRFKernels(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
                              bilateral_compat=10)  # the original's inference_segmentation.py
DEEPLAB_KERNELS = CRFKernels(gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                             bilateral_compat=4)  # deeplab-pytorch's VOC test setting
DEEPLAB_ITERATIONS = 10


def _pydensecrf() -> tuple[ModuleType, ModuleType]:
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as error:
        raise ImportError(
            "the dense CRF needs pydensecrf: install it with `pip install pydensecrf2` "
            "(the original's pydensecrf==1.0rc3 does not build on current Python)"
        ) from error
    return densecrf, utils


def _check_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the CRF needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if image.shape[:2] != (height, width):
        raise ValueError(f"image size {image.shape[:2]} differs from the label/probability size {(height, width)}")
    return np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # pydensecrf needs a writable buffer


def crf_inference_label(
    image: np.ndarray, labels: np.ndarray, n_labels: int, t: int = 10, gt_prob: float = 0.7
) -> np.ndarray:
    """Refine a ``(H, W)`` label map in ``0..n_labels-1`` on its ``(H, W, 3)`` uint8 RGB photo.

    The unary trusts each given label with ``gt_prob`` (label 0 is a real label, not "unsure");
    after ``t`` mean-field iterations the argmax ``(H, W)`` int64 map is returned.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    height, width = labels.shape
    image = _check_image(image, height, width)
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in 0..{n_labels - 1}, got {labels.min()}..{labels.max()}")
    if n_labels == 1:
        return np.zeros((height, width), dtype=np.int64)
    densecrf, utils = _pydensecrf()
    crf = densecrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(utils.unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=LABEL_GAUSSIAN_SXY, compat=LABEL_GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(
        sxy=LABEL_BILATERAL_SXY, srgb=LABEL_BILATERAL_SRGB, rgbim=image, compat=LABEL_BILATERAL_COMPAT
    )
    q = np.asarray(crf.inference(t)).reshape(n_labels, height, width)
    return np.argmax(q, axis=0)


def crf_inference(
    image: np.ndarray, probs: np.ndarray, t: int = 10, scale_factor: float = 1,
    kernels: CRFKernels = ORIGINAL_KERNELS,
) -> np.ndarray:
    """Refine class probabilities ``(C, H, W)`` on their ``(H, W, 3)`` uint8 RGB photo.

    Returns the mean-field marginals Q ``(C, H, W)`` float32 after ``t`` iterations. ``scale_factor``
    shrinks the spatial kernel widths for downscaled images.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {probs.shape}")
    if scale_factor <= 0:
        raise ValueError(f"scale_factor must be positive, got {scale_factor}")
    n_labels, height, width = probs.shape
    image = _check_image(image, height, width)
    densecrf, utils = _pydensecrf()
    crf = densecrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=kernels.gaussian_sxy / scale_factor, compat=kernels.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=kernels.bilateral_sxy / scale_factor,
        srgb=kernels.bilateral_srgb,
        rgbim=image,
        compat=kernels.bilateral_compat,
    )
    return np.asarray(crf.inference(t), dtype=np.float32).reshape(n_labels, height, width)


@dataclass(frozen=True)
class CRFSetting:
    """A named probability-CRF configuration: ``deeplab`` or ``<n>`` (the original's kernels, n iterations)."""

    name: str
    iterations: int
    kernels: CRFKernels

    def describe(self) -> str:
        return f"dense CRF '{self.name}': {self.iterations} iterations, {self.kernels}"


def parse_crf_setting(text: str) -> CRFSetting | None:
    """``none`` (or ``0``) -> None; ``deeplab`` -> DeepLab's kernels, 10 iterations; ``<n>`` -> the
    original's kernels with n iterations. Anything else is a ``ValueError``."""
    text = text.strip().lower()
    if text in ("none", "0"):
        return None
    if text == "deeplab":
        return CRFSetting("deeplab", DEEPLAB_ITERATIONS, DEEPLAB_KERNELS)
    if text.isdigit():
        return CRFSetting(text, int(text), ORIGINAL_KERNELS)
    raise ValueError(f"expected none, deeplab or a number of iterations, got {text!r}")

"""Random inputs of the benchmarks: smooth fields (CRFs and walks see regions, not pixel noise), photos,
image-level labels and label maps, and a folder of predictions with their ground truth."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from core.conventions import IGNORE_INDEX
from tools.artifacts.files import save_npz, save_png
from tools.scoring.labels import threshold_argmax

NUM_CLASSES = 21  # PASCAL VOC's, background included
CLASS_PROBABILITY = 0.15  # of each foreground class in a random image-level label
IGNORED_FRACTION = 0.05  # of the pixels of a random label map set to 255
PHOTO_BLUR_SIGMA = 8.0  # px of a photo or a full-resolution CAM
GRID_BLUR_SIGMA = 2.0  # cells of a stride-4 walk grid (the same scale)
CAM_KEYS = np.array([0, 5, 12])  # background and two classes
WALK_CLASSES = 2
EVALUATION_CLASSES = (1, 3)  # fewest and most classes of a random prediction
GT_THRESHOLD = 0.25  # background threshold of the random GT maps


def smooth_field(rng: np.random.Generator, channels: int, height: int, width: int, sigma: float) -> np.ndarray:
    """``(channels, height, width)`` float32 in ``[0, 1]``: uniform noise blurred by a Gaussian of ``sigma``
    pixels, stretched by one minimum and maximum over all channels."""
    noise = rng.random((channels, height, width), dtype=np.float32)
    blurred = np.stack([cv2.GaussianBlur(plane, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) for plane in noise])
    low, high = blurred.min(), blurred.max()
    return (blurred - low) / (high - low)


def cam_like(rng: np.random.Generator, channels: int, height: int, width: int, sigma: float) -> np.ndarray:
    """Class scores ``(channels, H, W)`` in ``[0, 1]``, mostly low with smooth peaks (a squared field)."""
    return smooth_field(rng, channels, height, width, sigma) ** 2


def random_photo(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 photo ``(H, W, 3)`` of smooth colour regions."""
    return (smooth_field(rng, 3, *size, PHOTO_BLUR_SIGMA).transpose(1, 2, 0) * 255).astype(np.uint8)


def photo_and_cams(size: tuple[int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 photo ``(H, W, 3)`` and CAMs ``(channels, H, W)`` of the same size."""
    rng = np.random.default_rng(0)
    return random_photo(rng, size), cam_like(rng, channels, *size, PHOTO_BLUR_SIGMA)


def random_images(batch: int, size: int, device: torch.device) -> Tensor:
    """A normal ``(B, 3, S, S)`` batch."""
    return torch.randn(batch, 3, size, size, device=device)


def random_class_labels(batch: int, device: torch.device) -> Tensor:
    """Image-level labels ``(B, K - 1)`` of the foreground classes, as the training datasets give them."""
    return (torch.rand(batch, NUM_CLASSES - 1, device=device) < CLASS_PROBABILITY).float()


def random_label_maps(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """Label maps ``(B, H, W)`` of random classes with ``IGNORED_FRACTION`` of the pixels at 255."""
    labels = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    return labels.masked_fill(torch.rand(labels.shape, device=device) < IGNORED_FRACTION, IGNORE_INDEX)


def write_evaluation_inputs(folder: Path, count: int, sides: tuple[int, int]) -> list[str]:
    """``count`` predictions ``<id>.npz`` (``keys``, ``hr_cam (n, H, W)``) under ``folder/predictions`` and
    their GT PNGs under ``folder/gt``; every image has its own ``H, W`` in ``sides`` and 1-3 classes."""
    rng = np.random.default_rng(0)
    ids = [f"{index:05d}" for index in range(count)]
    for image_id in ids:
        height, width = (int(side) for side in rng.integers(sides[0], sides[1] + 1, size=2))
        classes = rng.choice(np.arange(1, NUM_CLASSES), rng.integers(EVALUATION_CLASSES[0], EVALUATION_CLASSES[1] + 1),
                             replace=False)
        keys = np.concatenate([[0], np.sort(classes)])
        hr_cam = cam_like(rng, len(classes), height, width, PHOTO_BLUR_SIGMA)
        truth = cam_like(rng, len(classes), height, width, PHOTO_BLUR_SIGMA)
        save_npz(folder / "predictions" / f"{image_id}.npz", keys=keys, hr_cam=hr_cam)
        save_png(folder / "gt" / f"{image_id}.png", keys[threshold_argmax(truth, GT_THRESHOLD)])
    return ids

"""Dense CRF helpers: boundaries move to image edges, on a synthetic disc and on real VOC photos."""
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tools.artifacts.files import load_label_png
from tools.scoring.crf import crf_inference, crf_inference_label

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} is absent")
# photos with a clear object / background contrast, where a label CRF is expected to help
CRF_PHOTO_IDS = ("2007_001239", "2007_002618", "2007_006946")
DILATION_PX = 6


def disc_scene(seed: int = 0):
    """A red disc on a blue background, its true mask and a label map with a jittered boundary."""
    rng = np.random.default_rng(seed)
    height, width, radius = 64, 80, 20
    yy, xx = np.mgrid[:height, :width]
    distance = np.hypot(yy - height / 2, xx - width / 2)
    truth = (distance < radius).astype(np.int64)
    colours = np.where(truth[..., None] == 1, [220, 50, 40], [40, 90, 200]).astype(float)
    image = np.clip(colours + rng.normal(0, 8, colours.shape), 0, 255).astype(np.uint8)
    angle_bin = ((np.arctan2(yy - height / 2, xx - width / 2) + np.pi) / (2 * np.pi) * 24).astype(int) % 24
    jitter = rng.uniform(-5, 5, 24)[angle_bin]
    noisy = (distance < radius + jitter).astype(np.int64)
    boundary_band = np.abs(distance - radius) < 7
    return image, truth, noisy, boundary_band


def test_label_crf_repairs_a_jittered_boundary_on_a_synthetic_disc():
    image, truth, noisy, band = disc_scene()
    refined = crf_inference_label(image, noisy, n_labels=2, t=10)
    errors_before = (noisy != truth)[band].sum()
    errors_after = (refined != truth)[band].sum()
    assert refined.shape == truth.shape and set(np.unique(refined)) <= {0, 1}
    assert errors_before > 100
    assert errors_after < 0.2 * errors_before
    assert (refined == truth)[~band].all()


def test_softmax_crf_returns_marginals_and_repairs_the_boundary():
    image, truth, noisy, band = disc_scene(seed=1)
    probs = np.stack([np.where(noisy == 0, 0.7, 0.3), np.where(noisy == 1, 0.7, 0.3)]).astype(np.float32)
    q = crf_inference(image, probs, t=10)
    assert q.shape == (2, *truth.shape) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-4)
    assert (q.argmax(axis=0) != truth)[band].sum() < 0.2 * (noisy != truth)[band].sum()
    # a downscaled image gets narrower spatial kernels, which changes the result
    q_scaled = crf_inference(image, probs, t=10, scale_factor=4)
    assert not np.allclose(q, q_scaled)


def test_label_crf_with_one_label_and_bad_inputs():
    image, truth, noisy, _ = disc_scene()
    np.testing.assert_array_equal(crf_inference_label(image, np.zeros_like(noisy), n_labels=1), 0)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        crf_inference_label(image, noisy + 1, n_labels=2)
    with pytest.raises(ValueError, match="differs from the label"):
        crf_inference_label(image[:-1], noisy, n_labels=2)
    with pytest.raises(ValueError, match="RGB uint8"):
        crf_inference_label(image.astype(np.float32), noisy, n_labels=2)
    with pytest.raises(ValueError, match="scale_factor"):
        crf_inference(image, np.ones((2, *noisy.shape), np.float32) / 2, scale_factor=0)


def test_missing_pydensecrf_says_what_to_install(monkeypatch):
    image, _, noisy, _ = disc_scene()
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        crf_inference_label(image, noisy, n_labels=2)


@needs_sample
def test_real_voc_masks_decode_to_voc_values():
    masks = sorted((SAMPLE / "SegmentationClass").glob("*.png"))
    assert len(masks) == 26
    for path in masks:
        values = set(np.unique(load_label_png(path)).tolist())
        assert values <= set(range(21)) | {255}, path
        assert 255 in values and len(values - {0, 255}) >= 1, path


@needs_sample
@pytest.mark.parametrize("image_id", CRF_PHOTO_IDS)
def test_label_crf_pulls_a_dilated_real_mask_back_to_the_object(image_id):
    photo = np.asarray(Image.open(SAMPLE / "PNGImages" / f"{image_id}.png").convert("RGB"))
    mask = load_label_png(SAMPLE / "SegmentationClass" / f"{image_id}.png")
    classes = [c for c in np.unique(mask) if c != 255]
    truth = np.zeros(mask.shape, np.int64)  # local indices; the 255 band counts as background here
    for index, c in enumerate(classes):
        truth[mask == c] = index
    dilated = truth.copy()
    kernel = np.ones((2 * DILATION_PX + 1, 2 * DILATION_PX + 1), np.uint8)
    for index in range(1, len(classes)):
        grown = cv2.dilate((truth == index).astype(np.uint8), kernel) > 0
        dilated[grown & (dilated == 0)] = index

    refined = crf_inference_label(photo, dilated, n_labels=len(classes), t=10)

    scored = mask != 255
    agreement_before = (dilated == truth)[scored].mean()
    agreement_after = (refined == truth)[scored].mean()
    assert agreement_after > agreement_before + 0.005
    assert (refined == dilated).mean() > 0.9  # regions are kept, only boundaries move
    assert set(np.unique(refined)) == set(range(len(classes)))

"""sweep_confusions equals the per-threshold path (threshold_labels, erode_labels, confusion_stack)."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tools.artifacts.files import load_label_png, save_npz, save_png
from tools.artifacts.predictions import load_prediction
from tools.scoring.evaluation import EvaluationConfig, predict_labels, score_image, sweep_thresholds, threshold_labels
from tools.scoring.metrics import confusion_stack, erode_labels
from tools.scoring.sweep import sweep_confusions

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample"
SWEEP = sweep_thresholds(0.10, 0.40, 0.01)  # evaluate.py's default 31 thresholds
UNSORTED = (0.3, 0.1, 0.25, 0.1, -1.0, 0.4, 0.25, 2.0, 0.0, 0.35)  # duplicates, out of range
NUM_CLASSES = 21
IGNORE = 255
SIZES = [(1, 1), (1, 17), (17, 1), (3, 5), (6, 7), (7, 7), (8, 9), (31, 44), (50, 38)]
VOC_IMAGES = 4


def per_threshold(gt, maps, keys, thresholds, num_classes, ignore_index, erode):
    """The straightforward path: one label map, erosion and confusion matrix per threshold."""
    local = threshold_labels(maps, thresholds)
    if erode:
        local = np.stack([erode_labels(labels) for labels in local])
    return confusion_stack(gt, keys[local], num_classes, ignore_index)


def assert_same(gt, maps, keys, thresholds, erode, num_classes=NUM_CLASSES, ignore_index=IGNORE):
    expected = per_threshold(gt, maps, keys, thresholds, num_classes, ignore_index, erode)
    actual = sweep_confusions(gt, maps, keys, thresholds, num_classes, ignore_index, erode)
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


def quantised_maps(rng, num_maps, height, width, thresholds):
    """Blocky CAM-like maps whose scores are thresholds or 0 / 1: many ties, regions on the border."""
    values = np.concatenate([np.asarray(thresholds, np.float32), np.float32([0.0, 1.0])])
    cells = (rng.integers(1, 5), rng.integers(1, 5))
    coarse = rng.choice(values, size=(num_maps, *cells))
    maps = [cv2.resize(level, (width, height), interpolation=cv2.INTER_NEAREST) for level in coarse]
    return np.array(maps, dtype=np.float32).reshape(num_maps, height, width)


def random_case(rng, num_maps, height, width, thresholds, keys_from=NUM_CLASSES):
    maps = quantised_maps(rng, num_maps, height, width, thresholds)
    noisy = rng.random(maps.shape) < 0.02  # isolated pixels that break a window's class
    maps[noisy] = rng.choice(np.asarray(thresholds, np.float32), size=int(noisy.sum()))
    keys = np.concatenate([[0], rng.choice(np.arange(1, keys_from), num_maps, replace=False)])
    gt = rng.choice(keys, size=(height, width)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = IGNORE
    return gt, maps, keys


@pytest.mark.parametrize("erode", [True, False])
@pytest.mark.parametrize("thresholds", [SWEEP, UNSORTED], ids=["sweep", "unsorted"])
@pytest.mark.parametrize("num_maps", [0, 1, 2, 3])
def test_random_quantised_maps(num_maps, thresholds, erode):
    rng = np.random.default_rng(num_maps)
    for height, width in SIZES:
        for _ in range(3):
            assert_same(*random_case(rng, num_maps, height, width, thresholds), thresholds, erode)


@pytest.mark.parametrize("erode", [True, False])
def test_continuous_maps_in_float16_float32_float64(erode):
    rng = np.random.default_rng(1)
    for dtype in (np.float16, np.float32, np.float64):
        for height, width in [(5, 3), (40, 52)]:
            gt, _, keys = random_case(rng, 2, height, width, SWEEP)
            maps = cv2.resize(rng.random((2, 4)).astype(np.float32), (width, height))  # smooth, (H, W)
            maps = np.stack([maps, 0.5 - 0.5 * maps]).astype(dtype)
            assert_same(gt, maps, keys, SWEEP, erode)


def test_the_image_border_does_not_erode():
    gt = np.ones((12, 10), np.uint8)
    maps = np.zeros((2, 12, 10), np.float32)
    maps[0] = 0.2
    maps[1, 0, 0] = 0.9  # one pixel of the second class in a corner...
    maps[1, 4:8, 4:8] = 0.5  # ...and a 4x4 block: narrower than the window, so it vanishes
    keys = np.array([0, 1, 2])
    confusion = sweep_confusions(gt, maps, keys, (0.1,), NUM_CLASSES, IGNORE, erode=True)[0]
    # the class-1 pixels within 3 px of a class-2 pixel are lost, those on the border are not
    labels = np.ones((12, 10), bool)
    labels[:4, :4] = False
    labels[1:11, 1:11] = False
    survivors = labels.sum()
    assert confusion[1, 2] == 0
    assert confusion[1, 1] == survivors and confusion[1, 0] == gt.size - survivors
    assert_same(gt, maps, keys, (0.1, 0.2, 0.5), erode=True)


def test_a_map_covering_the_image_survives_erosion_everywhere():
    gt = np.full((4, 9), 3, np.uint8)
    maps = np.full((1, 4, 9), 0.3, np.float32)
    confusion = sweep_confusions(gt, maps, np.array([0, 3]), SWEEP, NUM_CLASSES, IGNORE, erode=True)
    foreground = confusion[:, 3, 3]
    np.testing.assert_array_equal(foreground, np.where(np.float32(SWEEP) < np.float32(0.3), gt.size, 0))
    np.testing.assert_array_equal(confusion[:, 3, 0], gt.size - foreground)


def test_infinite_scores_on_the_border():
    """cv2's default float border (FLT_MAX) would turn +inf into FLT_MAX; a threshold of FLT_MAX tells."""
    gt = np.zeros((5, 12), np.uint8)
    maps = np.full((1, 5, 12), np.inf, np.float32)
    maps[0, 2:, 8:] = -np.inf
    thresholds = (float(np.finfo(np.float32).max), 0.2)
    assert_same(gt, maps, np.array([0, 1]), thresholds, erode=True)
    assert sweep_confusions(gt, maps, np.array([0, 1]), thresholds, NUM_CLASSES, IGNORE, True)[0, 0, 1] > 0


def test_thresholds_are_compared_in_the_maps_dtype():
    """0.3 is below float32(0.3) in float64: the threshold must be cast before comparing."""
    gt = np.zeros((8, 8), np.uint8)
    maps = np.full((1, 8, 8), 0.3, np.float32)
    assert 0.3 < float(np.float32(0.3))
    confusion = sweep_confusions(gt, maps, np.array([0, 1]), (0.3,), NUM_CLASSES, IGNORE, erode=False)
    assert confusion[0, 0, 0] == gt.size  # equal score: background
    assert_same(gt, maps, np.array([0, 1]), (0.3,), erode=False)


def test_keys_equal_to_the_ignore_index_are_abstained():
    rng = np.random.default_rng(2)
    gt, maps, _ = random_case(rng, 2, 30, 40, SWEEP, keys_from=6)
    gt[gt == IGNORE] = 3
    keys = np.array([0, 3, 5])
    for erode in (True, False):
        assert_same(gt, maps, keys, SWEEP, erode, num_classes=6, ignore_index=3)
        confusion = sweep_confusions(gt, maps, keys, SWEEP, 6, 3, erode)
        assert confusion.shape == (len(SWEEP), 6, 7) and confusion[:, :, 6].any()


def test_no_thresholds():
    rng = np.random.default_rng(3)
    gt, maps, keys = random_case(rng, 2, 9, 11, SWEEP)
    confusion = sweep_confusions(gt, maps, keys, (), NUM_CLASSES, IGNORE, erode=True)
    assert confusion.shape == (0, NUM_CLASSES, NUM_CLASSES + 1)


@pytest.mark.parametrize("erode", [True, False])
def test_empty_image(erode):
    assert_same(np.zeros((0, 5), np.uint8), np.zeros((2, 0, 5), np.float32), np.array([0, 1, 2]), SWEEP, erode)


def test_errors_match_confusion_stack():
    rng = np.random.default_rng(4)
    gt, maps, keys = random_case(rng, 2, 10, 12, SWEEP)
    bad_gt = gt.copy()
    bad_gt[0, 0] = NUM_CLASSES
    for function in (per_threshold, sweep_confusions):
        with pytest.raises(ValueError, match="GT holds class 21"):
            function(bad_gt, maps, keys, SWEEP, NUM_CLASSES, IGNORE, True)
        with pytest.raises(ValueError, match="prediction shape"):
            function(gt[:, 1:], maps, keys, SWEEP, NUM_CLASSES, IGNORE, True)
    # a key outside the classes is an error only where its map wins at some valid pixel
    weak = np.concatenate([maps[:1], maps[:1] - 1.0])
    unused, used = np.array([0, 1, 99]), np.array([0, 99, 1])
    for erode in (True, False):
        assert_same(gt, weak, unused, SWEEP, erode)
        for function in (per_threshold, sweep_confusions):
            with pytest.raises(ValueError, match="prediction holds class 99"):
                function(gt, np.full_like(weak, 0.5), used, SWEEP, NUM_CLASSES, IGNORE, erode)


def voc_masks():
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} is absent")
    paths = sorted((SAMPLE / "SegmentationClass").glob("*.png"))
    return [np.asarray(Image.open(path)) for path in paths[:: max(len(paths) // VOC_IMAGES, 1)][:VOC_IMAGES]]


def cam_like_maps(rng, mask, classes):
    """Blurred class masks plus noise, quantised to 0.01 (ties with the sweep's thresholds)."""
    maps = []
    for label in classes:
        blurred = cv2.GaussianBlur((mask == label).astype(np.float32), (0, 0), sigmaX=8.0)
        noisy = 0.7 * blurred + 0.15 * rng.random(mask.shape, dtype=np.float32)
        maps.append(np.round(noisy * 100) / 100)
    return np.stack(maps).astype(np.float32).reshape(len(classes), *mask.shape)


@pytest.mark.parametrize("erode", [True, False])
def test_real_voc_masks(erode):
    rng = np.random.default_rng(5)
    for mask in voc_masks():
        assert (mask == IGNORE).any()
        classes = [label for label in np.unique(mask) if label not in (0, IGNORE)]
        keys = np.array([0, *classes])
        assert_same(mask, cam_like_maps(rng, mask, classes), keys, SWEEP, erode)


@pytest.mark.parametrize("post_process", ["erode", "none"])
def test_evaluate_counts_the_sweep_as_the_per_threshold_path(tmp_path, post_process):
    rng = np.random.default_rng(7)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    config = EvaluationConfig(pred_dir, gt_dir, "npy", SWEEP, NUM_CLASSES, IGNORE, post_process=post_process)
    ids = [f"img{index}" for index in range(6)]
    for index, image_id in enumerate(ids):
        gt, maps, keys = random_case(rng, index % 4, 20 + 7 * index, 31 - 3 * index, SWEEP)
        save_npz(pred_dir / f"{image_id}.npz", keys=keys, hr_cam=maps)
        save_png(gt_dir / f"{image_id}.png", gt)
    for image_id in ids:
        content = load_prediction(pred_dir / f"{image_id}.npz", NUM_CLASSES)
        gt = load_label_png(gt_dir / f"{image_id}.png")
        expected = confusion_stack(gt, predict_labels(config, image_id, content["keys"], content["hr_cam"], None),
                                   NUM_CLASSES, IGNORE)
        np.testing.assert_array_equal(score_image(config, image_id), expected)

"""Confusion counts, IoU / FP / FN as the original defines them, and the erosion post-process."""
import numpy as np
import pytest

from tools.scoring.metrics import ConfusionAccumulator, confusion_stack, erode_labels, scores_from_confusion

GT = np.array([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 2, 255]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 2], [1, 255, 2, 0]])


def confusion_matrix(gt, prediction, num_classes, ignore_index=255):
    """One ``(H, W)`` prediction's ``(C, C + 1)`` counts."""
    return confusion_stack(gt, np.asarray(prediction)[None], num_classes, ignore_index)[0]


def test_confusion_matrix_by_hand_with_ignored_gt_and_abstained_prediction():
    matrix = confusion_matrix(GT, PRED, num_classes=4)
    # rows: GT 0..3; columns: predicted 0..3, then "abstained" (prediction 255)
    expected = np.array(
        [
            [2, 1, 0, 0, 0],
            [0, 3, 0, 0, 1],
            [1, 0, 2, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(matrix, expected)


def test_iou_fp_fn_by_hand():
    scores = scores_from_confusion(confusion_matrix(GT, PRED, num_classes=4), mean_over="present")
    # class 0: T=3 P=3 TP=2; class 1: T=4 P=4 TP=3; class 2: T=3 P=2 TP=2; class 3 absent
    np.testing.assert_allclose(scores.iou[:3], [2 / 4, 3 / 5, 2 / 3])
    np.testing.assert_allclose(scores.fp[:3], [1 / 4, 1 / 5, 0 / 3], atol=1e-12)
    np.testing.assert_allclose(scores.fn[:3], [1 / 4, 1 / 5, 1 / 3])
    assert np.isnan(scores.iou[3]) and np.isnan(scores.fp[3]) and np.isnan(scores.fn[3])
    assert scores.miou == pytest.approx(100 * (2 / 4 + 3 / 5 + 2 / 3) / 3)
    assert scores.miou_foreground == pytest.approx(100 * (3 / 5 + 2 / 3) / 2)
    assert scores.fp_all == pytest.approx((1 / 4 + 1 / 5 + 0) / 3)
    assert scores.fn_all == pytest.approx((1 / 4 + 1 / 5 + 1 / 3) / 3)


def test_class_only_predicted_counts_as_zero_iou():
    gt = np.zeros((2, 2), int)
    pred = np.array([[0, 3], [0, 0]])
    scores = scores_from_confusion(confusion_matrix(gt, pred, num_classes=4), mean_over="present")
    assert scores.iou[3] == 0.0 and scores.fp[3] == pytest.approx(1.0) and scores.fn[3] == 0.0
    assert scores.miou == pytest.approx(100 * (3 / 4 + 0.0) / 2)


def test_mean_over_all_counts_absent_classes_as_zero_like_the_original():
    gt = np.zeros((2, 2), int)
    pred = np.array([[0, 3], [0, 0]])
    matrix = confusion_matrix(gt, pred, num_classes=4)
    scores = scores_from_confusion(matrix)  # the default: every class of the dataset
    tp, total = np.diagonal(matrix[:, :4]), matrix.sum(axis=1) + matrix[:, :4].sum(axis=0)
    original = 100 * np.mean(tp / (total - tp + 1e-10))  # the original's formula, absent classes give 0
    assert scores.mean_over == "all" and scores.miou == pytest.approx(original) == pytest.approx(100 * 0.75 / 4)
    assert scores_from_confusion(matrix, "present").miou == pytest.approx(100 * 0.75 / 2)


def test_scores_match_a_per_pixel_reference_on_random_maps():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (30, 40))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, (30, 40))
    scores = scores_from_confusion(confusion_matrix(gt, pred, num_classes=5))
    for c in range(5):
        valid = gt != 255
        tp = np.logical_and(gt == c, pred == c).sum()
        t = (gt == c).sum()
        p = np.logical_and(pred == c, valid).sum()
        assert scores.iou[c] == pytest.approx(tp / (t + p - tp))
        assert scores.fp[c] == pytest.approx((p - tp) / (t + p - tp))
        assert scores.fn[c] == pytest.approx((t - tp) / (t + p - tp))


def test_stacked_thresholds_equal_separate_matrices():
    rng = np.random.default_rng(1)
    stacked = ConfusionAccumulator(num_classes=6, num_thresholds=4)
    separate = [ConfusionAccumulator(num_classes=6) for _ in range(4)]
    for _ in range(3):
        gt = rng.integers(0, 6, (17, 23))
        gt[:2] = 255
        predictions = rng.integers(0, 6, (4, 17, 23))
        stacked.update(gt, predictions)
        for accumulator, prediction in zip(separate, predictions):
            accumulator.update(gt, prediction)
        np.testing.assert_array_equal(
            confusion_stack(gt, predictions, 6), np.stack([confusion_matrix(gt, p, 6) for p in predictions])
        )
    for threshold, accumulator in enumerate(separate):
        np.testing.assert_array_equal(stacked.matrix[threshold], accumulator.matrix[0])
        assert stacked.scores()[threshold].miou == accumulator.scores()[0].miou


def test_out_of_range_values_and_shape_mismatch_are_errors():
    with pytest.raises(ValueError, match="GT holds class 7"):
        confusion_matrix(np.array([[7, 0]]), np.array([[0, 0]]), num_classes=4)
    with pytest.raises(ValueError, match="prediction holds class 9"):
        confusion_matrix(np.array([[1, 0]]), np.array([[9, 0]]), num_classes=4)
    with pytest.raises(ValueError, match="differs from the GT shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), num_classes=4)
    with pytest.raises(ValueError, match="does not match"):
        ConfusionAccumulator(4, 2).add(np.zeros((1, 4, 5), np.int64))


def test_erosion_shrinks_regions_by_3_px_but_not_at_the_image_border():
    labels = np.zeros((30, 40), np.int64)
    labels[5:15, 5:15] = 1  # inside the image
    labels[0:10, 30:40] = 2  # in the top-right corner
    eroded = erode_labels(labels)
    expected = np.zeros_like(labels)
    expected[8:12, 8:12] = 1
    expected[0:7, 33:40] = 2
    np.testing.assert_array_equal(eroded, expected)
    assert eroded.dtype == labels.dtype


def test_erosion_drops_thin_regions_and_keeps_background_label_zero():
    labels = np.full((20, 20), 3, np.int64)
    labels[:, 9:12] = 1  # a 3 px wide stripe disappears entirely
    eroded = erode_labels(labels)
    assert not (eroded == 1).any()
    # the 3-labelled halves touch the border on three sides and lose 3 px next to the stripe
    assert (eroded[:, :6] == 3).all() and (eroded[:, 6:15] == 0).all() and (eroded[:, 15:] == 3).all()

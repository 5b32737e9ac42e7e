"""Threshold argmax, pseudo-label and affinity-label rules on hand-made score maps."""
import numpy as np

from tools.scoring.labels import affinity_label, scores_to_label, threshold_argmax


def test_threshold_argmax_ties_go_to_background():
    scores = np.array([[[0.2, 0.5, 0.9]], [[0.1, 0.6, 0.3]]], np.float32)  # (2, 1, 3)
    np.testing.assert_array_equal(threshold_argmax(scores, 0.2), [[0, 2, 1]])
    np.testing.assert_array_equal(threshold_argmax(scores, 0.95), [[0, 0, 0]])


def test_scores_to_label_maps_local_indices_through_keys():
    scores = np.array([[[0.9, 0.1]], [[0.2, 0.8]]], np.float32)
    np.testing.assert_array_equal(scores_to_label(scores, np.array([0, 4, 17]), 0.5), [[4, 17]])


def test_affinity_label_rule_without_crf_effect():
    # A flat grey image: the CRF with t=0 iterations returns the unary argmax, i.e. the input labels.
    image = np.full((1, 4, 3), 128, np.uint8)
    hr_cam = np.array([[[0.05, 0.12, 0.5, 0.14]]], np.float32)  # one class, id 3
    keys = np.array([0, 3])
    label = affinity_label(image, hr_cam, keys, fg_threshold=0.11, bg_threshold=0.15, crf_iteration=0)
    # fg 0.11: class at 0.12, 0.5, 0.14; bg 0.15: class only at 0.5. Background where both say so.
    np.testing.assert_array_equal(label, [[0, 3, 3, 3]])
    swapped = affinity_label(image, hr_cam, keys, fg_threshold=0.15, bg_threshold=0.11, crf_iteration=0)
    # confident fg only at 0.5; the bg map still sees the class at 0.12 and 0.14: uncertain
    np.testing.assert_array_equal(swapped, [[0, 255, 3, 255]])


def test_affinity_label_crf_cleans_an_isolated_pixel():
    rng = np.random.default_rng(0)
    image = np.zeros((24, 24, 3), np.uint8)
    image[:, 12:] = 220
    image = (image + rng.integers(0, 10, image.shape)).astype(np.uint8)
    hr_cam = np.zeros((1, 24, 24), np.float32)
    hr_cam[0, :, 12:] = 0.9
    hr_cam[0, 5, 3] = 0.9  # a speck of foreground on the dark half
    label = affinity_label(image, hr_cam, np.array([0, 2]), 0.11, 0.15)
    assert label[5, 3] == 0 and (label[:, 14:] == 2).all() and (label[:, :10] == 0).all()

"""Artifact naming and atomic, pickle-free I/O."""
import os
import stat

import numpy as np
import pytest

from tools.artifacts import files, folders, paths, predictions
from tools.artifacts.files import ArtifactError


def test_experiment_names_follow_the_original():
    cam = paths.cam_experiment_name("SemFormer@CAAE@DeiT-B-Dist", "train_aug", [0.5, 1, 1.5, 2.0])
    assert cam == "SemFormer@CAAE@DeiT-B-Dist@train@scale=0.5,1.0,1.5,2.0"
    assert paths.cam_experiment_name("T", "val", [1.0]) == "T@val@scale=1.0"
    assert paths.affinity_label_name(cam, 0.11, 0.15) == cam + "@aff_fg=0.11_bg=0.15"
    rw = paths.random_walk_name("AffinityNet@SemFormer", "train_aug", 10, 8)
    assert rw == "AffinityNet@SemFormer@train@beta=10@exp_times=8@rw"
    assert paths.pseudo_label_name(rw, 1) == rw + "@crf=1"


def test_npz_roundtrip_without_pickle(tmp_path):
    path = tmp_path / "a" / "x.npz"
    keys = np.array([0, 3, 7])
    cam = np.random.rand(2, 3, 4).astype(np.float32)
    files.save_npz(path, keys=keys, cam=cam, hr_cam=cam)
    loaded = predictions.load_prediction(path, num_classes=8)
    np.testing.assert_array_equal(loaded["keys"], keys)
    np.testing.assert_array_equal(loaded["cam"], cam)
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]  # no temporary left behind


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "y.npz"
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path):
    previous = os.umask(0o022)
    try:
        files.atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_legacy_npy_dict_needs_allow_pickle(tmp_path):
    path = tmp_path / "2007_000001.npy"
    np.save(path, {"keys": np.array([0, 5]), "hr_cam": np.ones((1, 2, 2), np.float32)})
    with pytest.raises(ArtifactError, match="--allow_pickle"):
        predictions.load_prediction(path, num_classes=21)
    assert predictions.load_prediction(path, num_classes=21, allow_pickle=True)["keys"].tolist() == [0, 5]
    assert paths.prediction_file(tmp_path, "2007_000001") == path


def test_truncated_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "z.npz"
    files.save_npz(path, keys=np.array([0]))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ArtifactError, match="cannot read prediction"):
        predictions.load_prediction(path, num_classes=21)


def test_png_labels_palette_and_grayscale(tmp_path):
    label = np.array([[0, 1], [255, 20]], np.uint8)
    files.save_png(tmp_path / "p.png", label, palette=np.zeros((256, 3), np.uint8))
    files.save_png(tmp_path / "l.png", label)
    np.testing.assert_array_equal(files.load_label_png(tmp_path / "p.png"), label)
    np.testing.assert_array_equal(files.load_label_png(tmp_path / "l.png"), label)
    assert folders.missing_ids(tmp_path, ["p", "q"], ".png") == ["q"]

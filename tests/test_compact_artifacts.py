"""Compact CAM and random-walk files (format 2): round trips, unchanged evaluation, old formats, damage.

The CAMs are made as ``inference_semformer.py`` makes them (``core.cam.multiscale_cams`` over smooth,
noisy patch-grid activations of elliptic objects) at the PASCAL VOC photo size, so sizes and threshold
decisions are those of realistic maps.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cam import multiscale_cams, scaled_size
from tools.artifacts import codec
from tools.artifacts.codec import COMPACT_FORMAT, MAX_SCORE, SCORE_SCALE
from tools.artifacts.files import ArtifactError, save_npz
from tools.artifacts.predictions import load_prediction, save_cams, save_walk
from tools.scoring.evaluation import EvaluationConfig, evaluate, sweep_thresholds, threshold_labels

HEIGHT, WIDTH = 375, 500  # a PASCAL VOC photo
NUM_CLASSES = 21
PATCH = 16
SCALES = (0.5, 1.0, 1.5, 2.0)
STEP = 1 / SCORE_SCALE
HALF_STEP_TOLERANCE = STEP / 2 + 1e-7  # half a grid step, plus float32 rounding of the decode
SWEEP = sweep_thresholds(0.10, 0.40, 0.01)  # the original's 31 thresholds
MIOU_TOLERANCE = 1e-3  # percentage points: ties between classes on one grid step may move a few pixels
MIN_CAM_RATIO, MIN_WALK_RATIO = 5.0, 8.0  # measured 6.3 and 10.8 on the test's 2-class photo


def object_mask(rng: np.random.Generator, classes: list[int]) -> np.ndarray:
    """``(H, W)`` uint8 mask with one or two ellipses per class (later ones on top)."""
    rows, columns = np.mgrid[:HEIGHT, :WIDTH]
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    for label in classes:
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
            ry, rx = rng.uniform(30, 150), rng.uniform(30, 200)
            mask[((rows - cy) / ry) ** 2 + ((columns - cx) / rx) ** 2 < 1] = label
    return mask


def realistic_cams(mask: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """``keys``, ``cam`` and ``hr_cam`` of a photo with ``mask`` through the real multi-scale CAM code:
    activations ``(2, K, h/16, w/16)`` are each class's mask averaged over patches, with noise."""
    classes = [int(label) for label in np.unique(mask) if label != 0]
    fields = torch.zeros(1, NUM_CLASSES, HEIGHT, WIDTH)
    for label in classes:
        fields[0, label] = torch.from_numpy((mask == label).astype(np.float32)) * (1 + label / 10)
    generator = torch.Generator().manual_seed(seed)

    def activations(batch: torch.Tensor) -> torch.Tensor:
        grid = torch.nn.functional.interpolate(fields, (batch.shape[-2] // PATCH, batch.shape[-1] // PATCH),
                                               mode="area")
        grid = grid + 0.05 * torch.randn(grid.shape, generator=generator)
        return torch.cat([grid, grid.flip(-1)])

    inputs = [torch.zeros(3, *scaled_size(HEIGHT, WIDTH, scale, PATCH)) for scale in SCALES]
    return multiscale_cams(activations, inputs, (HEIGHT, WIDTH), np.array([0, *classes]), PATCH)


@pytest.fixture(scope="module")
def photos() -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Three VOC-sized masks (1, 2 and 3 classes) and their CAMs."""
    rng = np.random.default_rng(0)
    cases = []
    for seed, count in enumerate((1, 2, 3)):
        mask = object_mask(rng, sorted(rng.choice(np.arange(1, NUM_CLASSES), count, replace=False).tolist()))
        cases.append((mask, realistic_cams(mask, seed)))
    return cases


def walk_of(cams: dict[str, np.ndarray]) -> np.ndarray:
    """A stand-in random walk ``(n, H, W)``: the CAMs squared, divided by one global max as the walk's."""
    rw = cams["hr_cam"] ** 2
    return rw / rw.max()


def one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(ArtifactError) as caught:
        load_prediction(path, NUM_CLASSES, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


# ----------------------------------------------------------------------------- round trips
def test_cam_file_reads_back_within_half_a_grid_step(photos, tmp_path):
    for index, (_, cams) in enumerate(photos):
        path = tmp_path / f"{index}.npz"
        save_cams(path, cams["keys"], cams["cam"], cams["hr_cam"])
        with np.load(path) as archive:
            assert int(archive["format"]) == COMPACT_FORMAT and archive["hr_cam"].dtype == np.uint16
        loaded = load_prediction(path, NUM_CLASSES, image_size=(HEIGHT, WIDTH), require=("cam", "hr_cam"))
        np.testing.assert_array_equal(loaded["keys"], cams["keys"])
        for name in ("cam", "hr_cam"):
            assert loaded[name].dtype == np.float32 and loaded[name].shape == cams[name].shape
            assert np.abs(loaded[name] - cams[name]).max() <= HALF_STEP_TOLERANCE
            np.testing.assert_array_equal(loaded[name] == 0, cams[name] == 0)  # zero stays exactly zero
        assert loaded["hr_cam"].max() < 1.0  # the CAMs' max / (max + 1e-5) stays below 1


@pytest.mark.parametrize("with_background", [False, True])
def test_walk_file_reads_back_within_half_a_grid_step(photos, tmp_path, with_background):
    _, cams = photos[2]
    rw = walk_of(cams)
    background = (1 - cams["hr_cam"].max(axis=0)) if with_background else None
    save_walk(tmp_path / "w.npz", cams["keys"], rw, background)
    loaded = load_prediction(tmp_path / "w.npz", NUM_CLASSES, image_size=(HEIGHT, WIDTH), require=("rw",))
    assert sorted(loaded) == (["keys", "rw", "rw_bg"] if with_background else ["keys", "rw"])
    assert loaded["rw"].dtype == np.float32 and np.abs(loaded["rw"] - rw).max() <= HALF_STEP_TOLERANCE
    assert 1 - HALF_STEP_TOLERANCE <= loaded["rw"].max() < 1  # the global max 1 reads as 1 - half a step
    if with_background:
        assert np.abs(loaded["rw_bg"] - background).max() <= HALF_STEP_TOLERANCE


def test_every_four_decimal_threshold_decides_as_on_float32_scores():
    thresholds = np.round(np.arange(0, 10001) / 10000, 4).astype(np.float32)
    near = np.concatenate([thresholds, np.nextafter(thresholds, np.float32(2)),
                           np.nextafter(thresholds, np.float32(-1))])
    scores = np.concatenate([near[near >= 0], np.random.default_rng(1).random(20000, dtype=np.float32)])
    decoded = codec.dequantise(codec.quantise_scores(scores))
    assert np.abs(decoded - scores).max() <= HALF_STEP_TOLERANCE
    for threshold in np.asarray(SWEEP + (0.05, 0.11, 0.15, 0.3333), dtype=np.float32):
        np.testing.assert_array_equal(decoded > threshold, scores > threshold)
    # how many of the sorted thresholds lie strictly below each score: equal counts, equal decisions
    np.testing.assert_array_equal(np.searchsorted(thresholds, decoded), np.searchsorted(thresholds, scores))


def test_planar_residuals_invert_exactly_even_where_they_wrap():
    codes = np.random.default_rng(2).integers(0, 2 ** 16, (2, 7, 9)).astype(np.uint16)
    np.testing.assert_array_equal(codec.planar_codes(codec.planar_residuals(codes)), codes)


# ----------------------------------------------------------------------------- results and size
def test_threshold_sweep_on_compact_files_matches_float32_files(photos, tmp_path):
    folders = {name: tmp_path / name for name in ("gt", "float32", "compact")}
    for folder in folders.values():
        folder.mkdir()
    ids, flips = [], 0
    for index, (mask, cams) in enumerate(photos):
        image_id = f"img{index}"
        ids.append(image_id)
        Image.fromarray(mask, mode="L").save(folders["gt"] / f"{image_id}.png")
        save_npz(folders["float32"] / f"{image_id}.npz", **cams)
        save_cams(folders["compact"] / f"{image_id}.npz", cams["keys"], cams["cam"], cams["hr_cam"])
        compact = load_prediction(folders["compact"] / f"{image_id}.npz", NUM_CLASSES)["hr_cam"]
        flips += int(np.count_nonzero(threshold_labels(compact, SWEEP) != threshold_labels(cams["hr_cam"], SWEEP)))
    assert flips <= 1e-6 * len(SWEEP) * HEIGHT * WIDTH * len(photos)  # measured: 0 here, 12 in 143M on VOC masks
    scores = {}
    for name in ("float32", "compact"):
        config = EvaluationConfig(pred_dir=folders[name], gt_dir=folders["gt"], mode="npy", thresholds=SWEEP,
                                  num_classes=NUM_CLASSES)
        scores[name] = [score.miou for score in evaluate(config, ids)]
    assert len(scores["compact"]) == len(SWEEP)
    np.testing.assert_allclose(scores["compact"], scores["float32"], rtol=0, atol=MIOU_TOLERANCE)
    assert np.argmax(scores["compact"]) == np.argmax(scores["float32"])


def test_compact_files_are_several_times_smaller(photos, tmp_path):
    _, cams = photos[1]
    save_npz(tmp_path / "cam32.npz", **cams)
    save_cams(tmp_path / "cam.npz", cams["keys"], cams["cam"], cams["hr_cam"])
    save_npz(tmp_path / "rw32.npz", keys=cams["keys"], rw=walk_of(cams))
    save_walk(tmp_path / "rw.npz", cams["keys"], walk_of(cams))
    size = {path.stem: path.stat().st_size for path in tmp_path.iterdir()}
    assert size["cam32"] / size["cam"] >= MIN_CAM_RATIO
    assert size["rw32"] / size["rw"] >= MIN_WALK_RATIO


# ----------------------------------------------------------------------------- older formats
def test_float32_files_without_a_format_marker_load_unchanged(photos, tmp_path):
    _, cams = photos[0]
    save_npz(tmp_path / "old.npz", **cams)
    save_npz(tmp_path / "walk.npz", keys=cams["keys"], rw=walk_of(cams), rw_bg=cams["hr_cam"][0])
    loaded = load_prediction(tmp_path / "old.npz", NUM_CLASSES, image_size=(HEIGHT, WIDTH))
    for name in ("keys", "cam", "hr_cam"):
        np.testing.assert_array_equal(loaded[name], cams[name])
    walk = load_prediction(tmp_path / "walk.npz", NUM_CLASSES, image_size=(HEIGHT, WIDTH))
    np.testing.assert_array_equal(walk["rw"], walk_of(cams))


def test_legacy_npy_still_needs_allow_pickle(tmp_path):
    path = tmp_path / "2007_000032.npy"
    np.save(path, {"keys": np.array([0, 1, 15]), "hr_cam": np.full((2, 4, 5), 0.5, np.float32)})
    assert "--allow_pickle" in one_line_error(path)
    loaded = load_prediction(path, NUM_CLASSES, allow_pickle=True, image_size=(4, 5))
    assert loaded["hr_cam"].dtype == np.float32 and loaded["keys"].tolist() == [0, 1, 15]


# ----------------------------------------------------------------------------- damage
def rewritten(path: Path, **changes: np.ndarray | None) -> Path:
    """Rewrite a compact file's raw arrays with some replaced (``None`` drops one)."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays.update(changes)
    save_npz(path, **{name: value for name, value in arrays.items() if value is not None})
    return path


@pytest.fixture()
def compact_file(photos, tmp_path) -> Path:
    _, cams = photos[1]
    save_cams(tmp_path / "c.npz", cams["keys"], cams["cam"], cams["hr_cam"])
    return tmp_path / "c.npz"


@pytest.mark.parametrize("changes, expected", [
    ({"scale": np.float32(SCORE_SCALE / 2)}, "'scale' .* must be 60000"),
    ({"scale": np.float32(0)}, "'scale' .* must be 60000"),
    ({"scale": np.full(2, SCORE_SCALE, np.float32)}, "'scale' .* got float32 array of shape"),
    ({"scale": None}, "needs a 'scale' array"),
    ({"format": np.int64(3)}, "format 3 is unknown"),
    ({"format": np.float64(2)}, "'format' must be an integer scalar"),
    ({"hr_cam": np.zeros((2, HEIGHT, WIDTH), np.float32)}, "'hr_cam' .* must be uint16 residuals"),
    ({"cam": np.zeros(5, np.uint16)}, "'cam' .* must be uint16 residuals"),
])
def test_damaged_compact_files_are_one_line_errors(compact_file, changes, expected):
    assert re.search(expected, one_line_error(rewritten(compact_file, **changes)))


def test_truncated_or_corrupted_compact_files_are_one_line_errors(compact_file):
    content = compact_file.read_bytes()
    compact_file.write_bytes(content[: len(content) // 2])
    assert "cannot read prediction" in one_line_error(compact_file)
    middle = len(content) // 2
    compact_file.write_bytes(content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1:])
    assert "cannot read prediction" in one_line_error(compact_file)


def test_decoded_arrays_are_checked_as_float32_files_are(compact_file, monkeypatch):
    assert "but the image needs 376x500" in one_line_error(compact_file, image_size=(HEIGHT + 1, WIDTH))
    monkeypatch.setattr(codec, "dequantise", lambda codes: np.full(codes.shape, np.nan, np.float32))
    assert "non-finite values" in one_line_error(compact_file)


def test_writers_refuse_scores_a_compact_file_cannot_hold(tmp_path):
    keys = np.array([0, 3])
    for bad in (np.nan, -0.1, MAX_SCORE + 0.01):
        with pytest.raises(ValueError, match="compact files hold"):
            save_walk(tmp_path / "w.npz", keys, np.full((1, 4, 4), bad, np.float32))
    assert not list(tmp_path.iterdir())


def test_compact_writes_are_atomic(photos, tmp_path, monkeypatch):
    _, cams = photos[0]
    path = tmp_path / "a.npz"
    save_cams(path, cams["keys"], cams["cam"], cams["hr_cam"])
    before = path.read_bytes()

    def killed(source, target):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        save_cams(path, cams["keys"], cams["cam"] / 2, cams["hr_cam"] / 2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.npz"]

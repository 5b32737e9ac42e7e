"""evaluate.py end to end (CLI and in-process), its protocol pieces, and the baseline CAMs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from tests.voc_layout import make_voc_layout, write_xml
from tools import baseline_cams
from tools.artifacts.files import ArtifactError, save_npz
from tools.artifacts.predictions import load_prediction
from tools.data.descriptor import DatasetError, voc_palette, write_descriptor
from tools.scoring.evaluation import sweep_thresholds, threshold_labels

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample"
VOC_DESCRIPTOR = REPO / "data" / "voc12" / "dataset.json"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} is absent")

CLASS_NAMES = ["background", "cat", "dog", "car"]
HEIGHT, WIDTH = 24, 32
# (class, y0, y1, x0, x1) rectangles per image, none touching the image border
OBJECTS = {
    "img_a": [(1, 4, 16, 6, 20)],
    "img_b": [(2, 3, 11, 4, 14), (3, 13, 21, 16, 29)],
    "img_c": [(3, 7, 19, 9, 25)],
}

READ_CLASSES = 256  # reading back in tests: any class id of a uint8 label map


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    image.save(path)


def gt_mask(image_id: str, ignore_row: bool = True) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    for c, y0, y1, x0, x1 in OBJECTS[image_id]:
        mask[y0:y1, x0:x1] = c
    if ignore_row:
        mask[HEIGHT - 1] = 255
    return mask


@pytest.fixture()
def dataset(tmp_path):
    """A tiny dataset (GT masks, photos, list, descriptor) and blurry CAM predictions as .npz."""
    root = tmp_path / "data"
    for folder in ("SegmentationClass", "JPEGImages"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    predictions = tmp_path / "pred"
    for image_id in OBJECTS:
        mask = gt_mask(image_id)
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        photo = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
        for c, y0, y1, x0, x1 in OBJECTS[image_id]:
            photo[y0:y1, x0:x1] = (60 * c, 200, 255 - 60 * c)
        Image.fromarray(photo).save(root / "JPEGImages" / f"{image_id}.jpg", quality=98)
        classes = [c for c, *_ in OBJECTS[image_id]]
        ramp = np.broadcast_to(np.linspace(0, 0.45, WIDTH), mask.shape)  # spills over the background
        hr_cam = np.stack([0.5 * (mask == c) + ramp + rng.uniform(0, 0.05, mask.shape) for c in classes])
        save_npz(predictions / f"{image_id}.npz", keys=np.array([0, *classes], np.int64),
                 hr_cam=hr_cam.astype(np.float32), cam=hr_cam[:, ::4, ::4].astype(np.float32))
    (root / "train.txt").write_text("\n".join(OBJECTS) + "\n")
    descriptor = root / "dataset.json"
    write_descriptor(descriptor, "tiny", CLASS_NAMES, {"train": "train.txt"})
    return {"root": root, "descriptor": descriptor, "pred": predictions, "out": tmp_path / "out"}


def base_args(case: dict, *extra: str) -> list[str]:
    return ["--pred_dir", str(case["pred"]), "--dataset", str(case["descriptor"]),
            "--output_dir", str(case["out"]), "--n_jobs", "1", *extra]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- protocol pieces
def test_default_sweep_is_the_original_31_thresholds_inclusive():
    thresholds = sweep_thresholds(0.10, 0.40, 0.01)
    assert len(thresholds) == 31 == len(np.arange(0.10, 0.40, 0.01))
    assert thresholds[0] == 0.10 and thresholds[15] == 0.25 and thresholds[-1] == 0.40
    assert sweep_thresholds(0.2, 0.2, 0.05) == (0.2,)
    with pytest.raises(ValueError, match="--step"):
        sweep_thresholds(0.1, 0.4, 0)


def test_threshold_labels_equal_argmax_behind_a_constant_plane():
    rng = np.random.default_rng(3)
    scores = rng.choice(np.float32([0.1, 0.2, 0.25, 0.3, 0.7]), size=(3, 9, 11))
    thresholds = (0.1, 0.2, 0.25, 0.5)
    labels = threshold_labels(scores, thresholds)
    for index, threshold in enumerate(thresholds):
        padded = np.pad(scores, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)
        np.testing.assert_array_equal(labels[index], np.argmax(padded, axis=0))  # ties -> background
    np.testing.assert_array_equal(threshold_labels(np.zeros((0, 4, 5), np.float32), (0.3,)), 0)


# ----------------------------------------------------------------------------- CLI on synthetic CAMs
def test_cli_sweep_equals_single_threshold_runs_and_writes_json_and_plot(dataset):
    completed = run_cli(*base_args(dataset, "--min_th", "0.2", "--max_th", "0.5", "--step", "0.1",
                                   "--n_jobs", "2"))
    assert completed.returncode == 0, completed.stderr
    json_path = dataset["out"] / "evaluation_train_npy.json"
    plot_path = dataset["out"] / "evaluation_train_npy.png"
    sweep = json.loads(json_path.read_text())
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [entry["threshold"] for entry in sweep["results"]] == [0.2, 0.3, 0.4, 0.5]
    assert "Th=0.30" in completed.stdout and "best: Th=" in completed.stdout
    for entry in sweep["results"]:
        single = evaluate.main(base_args(dataset, "--threshold", str(entry["threshold"])))
        assert single["results"][0] == entry
    best = max(sweep["results"], key=lambda entry: entry["miou"])
    assert sweep["best"] == best
    assert len({entry["miou"] for entry in sweep["results"]}) == 4  # the threshold matters


def test_default_protocol_sweeps_31_thresholds_with_erosion(dataset):
    result = evaluate.main(base_args(dataset))
    assert len(result["results"]) == 31
    assert result["settings"]["post_process"] == "erode"
    assert (dataset["out"] / "evaluation_train_npy.json").is_file()
    assert set(result["best"]["iou"]) == set(CLASS_NAMES)


def test_erosion_shrinks_exact_predictions_by_3_px(dataset, tmp_path):
    exact = tmp_path / "exact"
    for image_id in OBJECTS:
        mask = gt_mask(image_id)
        classes = [c for c, *_ in OBJECTS[image_id]]
        hr_cam = np.stack([(mask == c).astype(np.float32) * 0.99 for c in classes])
        save_npz(exact / f"{image_id}.npz", keys=np.array([0, *classes], np.int64), hr_cam=hr_cam)
    args = ["--pred_dir", str(exact), "--dataset", str(dataset["descriptor"]), "--output_dir",
            str(dataset["out"]), "--n_jobs", "1", "--threshold", "0.3"]
    plain = evaluate.main([*args, "--post_process", "none"])["results"][0]
    eroded = evaluate.main([*args, "--post_process", "erode"])["results"][0]
    assert plain["miou"] == pytest.approx(100.0) and plain["fp"] == 0 and plain["fn"] == 0
    assert (dataset["out"] / "evaluation_train_npy_post=none.json").is_file()
    # each rectangle keeps (h - 6) x (w - 6) pixels; the lost ring becomes background
    for c, name in enumerate(CLASS_NAMES[1:], start=1):
        boxes = [(y1 - y0, x1 - x0) for objects in OBJECTS.values() for k, y0, y1, x0, x1 in objects if k == c]
        total = sum(h * w for h, w in boxes)
        kept = sum((h - 6) * (w - 6) for h, w in boxes)
        assert eroded["iou"][name] == pytest.approx(100 * kept / total)
        assert eroded["fp_per_class"][name] == pytest.approx(0.0)
    assert eroded["fn_per_class"]["background"] == pytest.approx(0.0)
    assert eroded["fp_per_class"]["background"] > 0


def test_rw_mode_and_npy_fallback_to_rw(dataset, tmp_path):
    rw_dir = tmp_path / "rw"
    for image_id in OBJECTS:
        content = load_prediction(dataset["pred"] / f"{image_id}.npz", READ_CLASSES)
        save_npz(rw_dir / f"{image_id}.npz", keys=content["keys"], rw=content["hr_cam"])
    reference = evaluate.main(base_args(dataset, "--threshold", "0.3"))["results"][0]
    for mode in ("rw", "npy"):
        args = ["--pred_dir", str(rw_dir), "--dataset", str(dataset["descriptor"]), "--output_dir",
                str(dataset["out"]), "--n_jobs", "1", "--threshold", "0.3", "--mode", mode]
        assert evaluate.main(args)["results"][0] == reference
    with pytest.raises(ArtifactError, match="no 'rw' array"):
        evaluate.main(base_args(dataset, "--threshold", "0.3", "--mode", "rw"))


def test_crf_iteration_refines_on_the_photos(dataset):
    plain = evaluate.main(base_args(dataset, "--threshold", "0.3", "--post_process", "none"))
    refined = evaluate.main(base_args(dataset, "--threshold", "0.3", "--crf_iteration", "5"))
    assert (dataset["out"] / "evaluation_train_npy_crf=5.json").is_file()
    assert refined["settings"]["post_process"] == "none"
    # the photos have flat coloured rectangles, so the CRF removes most of the CAM noise
    assert refined["results"][0]["miou"] > plain["results"][0]["miou"] + 10


def test_legacy_pickled_npy_is_read_only_with_allow_pickle(dataset, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for image_id in OBJECTS:
        content = load_prediction(dataset["pred"] / f"{image_id}.npz", READ_CLASSES)
        np.save(legacy / f"{image_id}.npy", {"keys": content["keys"], "cam": content["cam"],
                                             "hr_cam": content["hr_cam"]})
    args = ["--pred_dir", str(legacy), "--dataset", str(dataset["descriptor"]), "--output_dir",
            str(dataset["out"]), "--n_jobs", "1", "--threshold", "0.25"]
    imported = evaluate.main([*args, "--allow_pickle"])
    native = evaluate.main(base_args(dataset, "--threshold", "0.25"))
    assert imported["results"] == native["results"]
    completed = run_cli(*args)
    assert completed.returncode != 0
    assert "--allow_pickle" in completed.stderr and "img_a.npy" in completed.stderr
    assert "Traceback" not in completed.stderr


# ----------------------------------------------------------------------------- bad inputs
def test_missing_prediction_names_the_first_missing_id(dataset):
    (dataset["pred"] / "img_b.npz").unlink()
    (dataset["pred"] / "img_c.npz").unlink()
    with pytest.raises(ArtifactError, match=r"2 of 3 predictions are missing; first missing id 'img_b'"):
        evaluate.main(base_args(dataset, "--threshold", "0.3"))


def test_missing_gt_size_mismatch_empty_list_and_missing_folder(dataset, tmp_path):
    gt = dataset["root"] / "SegmentationClass"
    (gt / "img_c.png").unlink()
    with pytest.raises(DatasetError, match=r"img_c\.png: GT mask of id 'img_c' is missing"):
        evaluate.main(base_args(dataset, "--threshold", "0.3"))
    write_palette_png(gt / "img_c.png", np.zeros((HEIGHT + 1, WIDTH), np.uint8))
    with pytest.raises(ArtifactError, match=r"img_c\.npz: 'hr_cam' is 24x32 but the image needs 25x32"):
        evaluate.main(base_args(dataset, "--threshold", "0.3"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="list file is empty"):
        evaluate.main(base_args(dataset, "--list", str(empty)))
    with pytest.raises(ArtifactError, match="prediction folder not found"):
        evaluate.main(["--pred_dir", str(tmp_path / "nowhere"), "--dataset", str(dataset["descriptor"])])
    completed = run_cli(*base_args(dataset, "--threshold", "0.3", "--list", str(empty)))
    assert completed.returncode != 0 and "list file is empty" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_gt_values_outside_the_descriptor_are_an_error(dataset):
    write_palette_png(dataset["root"] / "SegmentationClass" / "img_a.png", np.full((HEIGHT, WIDTH), 9, np.uint8))
    with pytest.raises(ArtifactError, match=r"img_a\.png .*GT holds class 9"):
        evaluate.main(base_args(dataset, "--threshold", "0.3"))


# ----------------------------------------------------------------------------- real VOC masks
def shifted(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask moved ``pixels`` to the right, background flowing in from the left."""
    moved = np.zeros_like(mask)
    moved[:, pixels:] = mask[:, :-pixels]
    return moved


def reference_scores(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[float, float, float]:
    """mIoU / FP / FN by plain per-class pixel counting (classes absent everywhere are skipped)."""
    ious, fps, fns = [], [], []
    for c in range(num_classes):
        t = sum(int(np.sum(gt == c)) for gt, _ in pairs)
        p = sum(int(np.sum(np.logical_and(pred == c, gt != 255))) for gt, pred in pairs)
        tp = sum(int(np.sum(np.logical_and(gt == c, pred == c))) for gt, pred in pairs)
        if t + p == 0:
            continue
        ious.append(tp / (t + p - tp))
        fps.append((p - tp) / (t + p - tp))
        fns.append((t - tp) / (t + p - tp))
    return 100 * float(np.mean(ious)), float(np.mean(fps)), float(np.mean(fns))


@needs_sample
def test_png_mode_on_real_voc_masks(tmp_path):
    gt_dir = SAMPLE / "SegmentationClass"
    ids = sorted(path.stem for path in gt_dir.glob("*.png"))
    id_list = tmp_path / "sample.txt"
    id_list.write_text("\n".join(ids) + "\n")
    common = ["--mode", "png", "--gt_dir", str(gt_dir), "--list", str(id_list), "--dataset",
              str(VOC_DESCRIPTOR), "--output_dir", str(tmp_path / "out"), "--n_jobs", "2", "--mean_over", "present"]

    itself = evaluate.main(["--pred_dir", str(gt_dir), *common])
    assert itself["best"]["miou"] == pytest.approx(100.0)
    over_all = evaluate.main(["--pred_dir", str(gt_dir), *common[:-1], "all"])  # the original's mean
    present = sum(value is not None for value in over_all["best"]["iou"].values())
    assert over_all["settings"]["mean_over"] == "all"
    assert over_all["best"]["miou"] == pytest.approx(100.0 * present / 21)
    assert itself["best"]["threshold"] is None
    assert (tmp_path / "out" / "evaluation_sample_png.json").is_file()

    moved_dir = tmp_path / "moved"
    moved_dir.mkdir()
    pairs = []
    for image_id in ids:
        mask = np.asarray(Image.open(gt_dir / f"{image_id}.png"))
        moved = shifted(mask, 9)
        write_palette_png(moved_dir / f"{image_id}.png", moved)
        pairs.append((mask, moved))
    result = evaluate.main(["--pred_dir", str(moved_dir), *common])["best"]
    miou, fp, fn = reference_scores(pairs, num_classes=21)
    assert 50 < miou < 95
    assert result["miou"] == pytest.approx(miou, rel=1e-9)
    assert result["fp"] == pytest.approx(fp, rel=1e-9)
    assert result["fn"] == pytest.approx(fn, rel=1e-9)


# ----------------------------------------------------------------------------- baseline CAMs
def test_baseline_cams_have_the_cam_artifact_layout_and_evaluate(tmp_path):
    descriptor = make_voc_layout(tmp_path / "voc", num_images=3)
    # a second object in the first image: two present classes
    write_xml(tmp_path / "voc" / "Annotations" / "2007_000000.xml", (56, 40),
              [("cat", (11, 9, 40, 30)), ("car", (2, 2, 20, 12))])
    experiments = tmp_path / "experiments"
    outputs = {}
    for kind in ("centre", "uniform"):
        outputs[kind] = baseline_cams.main(["--dataset", str(descriptor), "--kind", kind, "--experiment_name",
                                            f"Baseline@{kind}", "--experiments_dir", str(experiments)])
        assert outputs[kind] == experiments / "predictions" / f"Baseline@{kind}"
    sizes = {"2007_000000": (40, 56), "2007_000001": (48, 56), "2007_000002": (56, 56)}
    keys = {"2007_000000": [0, 1, 3], "2007_000001": [0, 2], "2007_000002": [0, 3]}
    for image_id, (height, width) in sizes.items():
        centre = load_prediction(outputs["centre"] / f"{image_id}.npz", READ_CLASSES)
        n = len(keys[image_id]) - 1
        assert centre["keys"].dtype == np.int64 and centre["keys"].tolist() == keys[image_id]
        assert centre["hr_cam"].dtype == np.float32 and centre["hr_cam"].shape == (n, height, width)
        assert centre["cam"].dtype == np.float32 and centre["cam"].shape == (n, -(-height // 4), -(-width // 4))
        for name in ("cam", "hr_cam"):
            peaks = centre[name].reshape(n, -1).max(axis=1)
            assert np.all((peaks > 0.99) & (peaks < 1.0))
        peak = np.unravel_index(centre["hr_cam"][0].argmax(), (height, width))
        assert abs(peak[0] - height / 2) <= 1 and abs(peak[1] - width / 2) <= 1
        assert centre["hr_cam"][0, 0, 0] < 0.2
        uniform = load_prediction(outputs["uniform"] / f"{image_id}.npz", READ_CLASSES)
        assert np.ptp(uniform["hr_cam"]) == 0 and uniform["hr_cam"].max() == pytest.approx(1.0, abs=1e-4)

    result = evaluate.main(["--experiment_name", "Baseline@centre", "--experiments_dir", str(experiments),
                            "--dataset", str(descriptor), "--n_jobs", "1", "--threshold", "0.5",
                            "--post_process", "none"])
    assert 0 < result["best"]["miou"] < 100
    assert (outputs["centre"] / "reports" / "evaluation_train_npy_post=none.json").is_file()

"""tools.prepare_coco: masks, lists, labels and descriptor of a COCO 2014 layout; rules, resuming, errors."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tools.cli.exits import run_main
from tools.data.descriptor import DatasetError, load_descriptor
from tools.data.synthetic.coco_writer import (COCO_CATEGORY_IDS, COCO_SPLIT_FOLDERS, CocoAnnotation, coco_file_name,
                                              coco_sample, generate_coco_dataset)
from tools.data.voc import read_mask_png
from tools.prepare_coco import DESCRIPTOR_FILE, INDEX_FILE, MASK_FOLDER, main, rle_string_counts

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES, NUM_TRAIN, NUM_VAL, SEED = 4, 10, 4, 0
MIN_SIZE, MAX_SIZE = 48, 80
KILL_SET = {"num_train": 40, "num_val": 2, "min_size": 160, "max_size": 240}
POLL_SECONDS = 0.002
SUBPROCESS_TIMEOUT = 120
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def _prepare(coco_dir: Path, out_dir: Path, *flags: str) -> str:
    """Run the CLI in-process as ``run_main`` does; returns its stderr (warnings, progress bars)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        run_main(lambda: main(["--coco_dir", str(coco_dir), "--out", str(out_dir), "--workers", "2", *flags]))
    return stderr.getvalue()


def _outputs(coco_dir: Path, out_dir: Path) -> dict[str, bytes]:
    """Every file prepare_coco writes (temporary files of a killed write excluded)."""
    files = sorted((coco_dir / MASK_FOLDER).glob("*.png")) + sorted(out_dir.iterdir())
    return {str(path): path.read_bytes() for path in files if not path.name.startswith(".")}


def _stem(split: str, index: int) -> str:
    return Path(coco_file_name(split, index)).stem


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The synthetic COCO export, prepared: ``(coco_dir, out_dir, stderr)``."""
    coco_dir = generate_coco_dataset(tmp_path_factory.mktemp("coco"), NUM_CLASSES, NUM_TRAIN, NUM_VAL, SEED,
                                     MIN_SIZE, MAX_SIZE, progress=False)
    out_dir = coco_dir / "prepared"
    return coco_dir, out_dir, _prepare(coco_dir, out_dir)


@pytest.fixture(scope="module")
def samples() -> dict[tuple[str, int], object]:
    counts = {"train": NUM_TRAIN, "val": NUM_VAL}
    return {(split, index): coco_sample(SEED, split, index, NUM_CLASSES, MIN_SIZE, MAX_SIZE)
            for split, count in counts.items() for index in range(count)}


def test_masks_equal_the_generators_ground_truth(prepared, samples):
    coco_dir, _, _ = prepared
    for (split, index), sample in samples.items():
        path = coco_dir / MASK_FOLDER / f"{_stem(split, index)}.png"
        if not sample.annotations:
            assert not path.exists(), path
            continue
        np.testing.assert_array_equal(read_mask_png(path), sample.mask, err_msg=str(path))
    assert not list(coco_dir.rglob("*.tmp")), "temporary files left behind"


def test_lists_labels_and_descriptor(prepared, samples):
    coco_dir, out_dir, _ = prepared
    index = json.loads((out_dir / INDEX_FILE).read_text())
    for split, folder in COCO_SPLIT_FOLDERS.items():
        annotated = [i for (s, i), sample in samples.items() if s == split and sample.annotations]
        assert (out_dir / f"{split}.txt").read_text().split() == [_stem(split, i) for i in annotated]
        for i in annotated:
            assert index[_stem(split, i)] == {"file": f"{folder}/{coco_file_name(split, i)}",
                                              "labels": samples[split, i].labels}
    assert len(index) == sum(bool(sample.annotations) for sample in samples.values())
    descriptor = load_descriptor(out_dir / DESCRIPTOR_FILE)
    assert descriptor.layout == "coco" and descriptor.index_file == out_dir / INDEX_FILE
    assert descriptor.class_names == ("background", "disc", "square", "triangle", "star")
    assert descriptor.ignore_index == 255 and descriptor.data_dir == coco_dir.resolve()
    assert descriptor.read_ids("train_aug") == descriptor.read_ids("train")


def _overlap_against_id_order(annotations: list[CocoAnnotation]) -> bool:
    """Two objects overlap where the larger has the higher id: painting by id would put it on top."""
    objects = [a for a in annotations if not a.iscrowd]
    return any((a.mask & b.mask).any() and a.mask.sum() > b.mask.sum() and a.annotation_id > b.annotation_id
               for a in objects for b in objects)


def test_the_synthetic_export_exercises_every_rule(prepared, samples):
    coco_dir, _, stderr = prepared
    content = json.loads((coco_dir / "annotations" / "instances_train2014.json").read_text())
    category_ids = [category["id"] for category in content["categories"]]
    assert sorted(category_ids) == list(COCO_CATEGORY_IDS[:NUM_CLASSES]) != category_ids  # gaps, not in order
    segmentations = [a["segmentation"] for a in content["annotations"]]
    assert any(isinstance(segmentation, list) for segmentation in segmentations)  # polygons
    for kind in (str, list):  # compressed and uncompressed RLE
        assert any(isinstance(segmentation, dict) and isinstance(segmentation["counts"], kind)
                   for segmentation in segmentations)
    assert any(a["iscrowd"] for a in content["annotations"])
    assert len(content["images"]) > len({a["image_id"] for a in content["annotations"]})  # unannotated image
    assert any(_overlap_against_id_order(sample.annotations) for sample in samples.values())
    assert any((sample.mask == 255).any() for sample in samples.values())
    assert any(set(sample.labels) - set(np.unique(sample.mask)) for sample in samples.values())  # crowd-only label
    assert "polygons reaching outside their image clipped" in stderr


def test_rerun_after_lost_masks_gives_identical_files(prepared):
    coco_dir, out_dir, _ = prepared
    before = _outputs(coco_dir, out_dir)
    masks = sorted((coco_dir / MASK_FOLDER).glob("*.png"))
    for path in [*masks[::2], out_dir / DESCRIPTOR_FILE, out_dir / "val.txt"]:
        path.unlink()
    _prepare(coco_dir, out_dir)
    assert _outputs(coco_dir, out_dir) == before


def test_sigkill_mid_way_then_rerun_completes_identical_files(tmp_path):
    coco_dir = generate_coco_dataset(tmp_path / "coco", NUM_CLASSES, seed=SEED, progress=False, **KILL_SET)
    out_dir = tmp_path / "prepared"
    command = [sys.executable, "-m", "tools.prepare_coco", "--coco_dir", str(coco_dir), "--out", str(out_dir),
               "--workers", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not list((coco_dir / MASK_FOLDER).glob("*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out_dir / DESCRIPTOR_FILE).exists() or process.returncode == 0
    _prepare(coco_dir, out_dir)
    resumed = _outputs(coco_dir, out_dir)
    fresh_dir = tmp_path / "fresh" / out_dir.name  # the descriptor's name is its folder's
    _prepare(coco_dir, fresh_dir, "--overwrite")
    fresh = {key.replace(str(fresh_dir), str(out_dir)): value for key, value in _outputs(coco_dir, fresh_dir).items()}
    assert resumed == fresh


# ----------------------------------------------------------------------------- hand-made set: rules and errors
HEIGHT, WIDTH = 8, 10
CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]  # dog -> 1, cat -> 2


def _rectangle(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": [0, *counts] if flat[0] else counts}


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}


def _hand_made(root: Path) -> dict:
    """Image 5 (train): a large dog polygon (id 1), a small cat RLE over it (id 2), a crowd of dogs on the
    right (id 3) and a cat inside the crowd (id 4); image 6 has no annotation. Val: image 9, one cat."""
    train = {
        "images": [{"id": 6, "file_name": "COCO_train2014_000000000006.jpg", "height": HEIGHT, "width": WIDTH},
                   {"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 6, 0, 6, 8, 0, 8]]},
            {"id": 2, "image_id": 5, "category_id": 7, "iscrowd": 0,
             "segmentation": _compressed(_rectangle(2, 2, 4, 4))},
            {"id": 3, "image_id": 5, "category_id": 3, "iscrowd": 1,
             "segmentation": _uncompressed(_rectangle(7, 0, 10, 8))},
            {"id": 4, "image_id": 5, "category_id": 7, "iscrowd": 0,
             "segmentation": [[8, 6, 9, 6, 9, 7, 8, 7], [8, 0, 12, 0, 12, 2, 8, 2]]},
        ],
        "categories": CATEGORIES,
    }
    val = {"images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "height": HEIGHT, "width": WIDTH}],
           "annotations": [{"id": 1, "image_id": 9, "category_id": 7, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}],
           "categories": CATEGORIES}
    for name, content in (("train2014", train), ("val2014", val)):
        _write_json(root / "annotations" / f"instances_{name}.json", content)
        for image in content["images"]:
            (root / name).mkdir(exist_ok=True)
            Image.new("RGB", (WIDTH, HEIGHT)).save(root / name / image["file_name"])
    return train


def _write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _fail(coco_dir: Path, out_dir: Path, capsys: pytest.CaptureFixture) -> str:
    """Run the CLI expecting exit status 1 and one error line on stderr (after any warnings); returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(["--coco_dir", str(coco_dir), "--out", str(out_dir), "--workers", "1"]))
    assert stop.value.code == 1
    *warnings, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: ") and all(line.startswith("warning: ") for line in warnings), warnings
    assert not (out_dir / DESCRIPTOR_FILE).exists()
    return error


def test_hand_made_overlap_crowd_and_labels(tmp_path, capsys):
    _hand_made(tmp_path)
    _prepare(tmp_path, tmp_path / "out")
    expected = np.zeros((HEIGHT, WIDTH), np.uint8)
    expected[:, :6] = 1  # the dog polygon, pycocotools' pixels: columns 0..5
    expected[2:4, 2:4] = 2  # the smaller cat on top
    expected[:, 7:] = 255  # crowd
    expected[6:7, 8:9] = 2  # a cat inside the crowd keeps its class
    expected[0:2, 8:] = 2  # a polygon reaching outside, clipped
    mask = read_mask_png(tmp_path / MASK_FOLDER / "COCO_train2014_000000000005.png")
    np.testing.assert_array_equal(mask, expected)
    assert (tmp_path / "out" / "train.txt").read_text() == "COCO_train2014_000000000005\n"
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["COCO_train2014_000000000005"]["labels"] == [1, 2]
    assert load_descriptor(tmp_path / "out" / DESCRIPTOR_FILE).class_names == ("background", "dog", "cat")


def test_warnings_are_counted_not_fatal(tmp_path):
    train = _hand_made(tmp_path)
    train["annotations"].append({"id": 8, "image_id": 6, "category_id": 3, "segmentation": [[1, 1, 2, 2]]})
    _write_json(tmp_path / "annotations" / "instances_train2014.json", train)
    (tmp_path / "val2014" / "COCO_val2014_000000000009.jpg").unlink()
    val = json.loads((tmp_path / "annotations" / "instances_val2014.json").read_text())
    val["images"].append({"id": 10, "file_name": "COCO_val2014_000000000010.jpg", "height": HEIGHT, "width": WIDTH})
    val["annotations"].append({"id": 2, "image_id": 10, "category_id": 3, "segmentation": [[0, 0, 3, 0, 3, 3]]})
    _write_json(tmp_path / "annotations" / "instances_val2014.json", val)
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "val2014" / "COCO_val2014_000000000010.jpg")
    stderr = _prepare(tmp_path, tmp_path / "out")
    assert "1 polygons of fewer than 3 points skipped (first: annotation 8 of image 6)" in stderr
    assert "1 annotations without a polygon of 3 points or more skipped" in stderr
    assert "1 polygons reaching outside their image clipped (first: annotation 4 of image 5)" in stderr
    assert "1 images whose photo is missing left out" in stderr
    assert (tmp_path / "out" / "val.txt").read_text() == "COCO_val2014_000000000010\n"
    assert (tmp_path / "out" / "train.txt").read_text() == "COCO_train2014_000000000005\n"


def _break(root: Path, breakage: str) -> None:
    path = root / "annotations" / "instances_train2014.json"
    content = json.loads(path.read_text())
    if breakage == "missing":
        path.unlink()
    elif breakage == "not_json":
        path.write_text('{"images": [')
    elif breakage == "no_annotations_key":
        del content["annotations"]
    elif breakage == "unknown_image":
        content["annotations"][0]["image_id"] = 99
    elif breakage == "unknown_category":
        content["annotations"][0]["category_id"] = 2
    elif breakage == "missing_image_key":
        del content["images"][0]["height"]
    elif breakage == "rle_size":
        content["annotations"][1]["segmentation"]["size"] = [HEIGHT, WIDTH + 1]
    elif breakage == "rle_runs":
        content["annotations"][2]["segmentation"]["counts"][-1] += 1
    elif breakage == "bad_polygon":
        content["annotations"][0]["segmentation"] = [["a", "b", "c", "d", "e", "f"]]
    elif breakage == "other_categories":
        path = root / "annotations" / "instances_val2014.json"
        content = json.loads(path.read_text())
        content["categories"][0]["name"] = "bird"
    if breakage not in ("missing", "not_json"):
        _write_json(path, content)


@pytest.mark.parametrize("breakage, message", [
    ("missing", "instances_train2014.json: annotation file not found"),
    ("not_json", "instances_train2014.json: not valid JSON"),
    ("no_annotations_key", "instances_train2014.json: no 'annotations' list"),
    ("unknown_image", "instances_train2014.json: annotations[0]: image id 99 is not in 'images'"),
    ("unknown_category", "annotations[0]: category id 2 is not in 'categories'"),
    ("missing_image_key", "instances_train2014.json: images[0] is not an object with the keys"),
    ("rle_size", "annotations[1] (id 2): RLE size [8, 11] is not the image's [8, 10]"),
    ("rle_runs", "annotations[2] (id 3): RLE runs must be non-negative integers adding up to 8 x 10"),
    ("bad_polygon", "annotations[0] (id 1) polygon 0: a polygon is a flat list of x, y numbers"),
    ("other_categories", "instances_val2014.json: its categories differ from those of"),
])
def test_bad_annotation_files_give_one_line_errors(tmp_path, capsys, breakage, message):
    _hand_made(tmp_path)
    _break(tmp_path, breakage)
    assert message in _fail(tmp_path, tmp_path / "out", capsys)
    assert not (tmp_path / MASK_FOLDER).exists()  # checked before any mask is written


def test_missing_coco_dir_is_an_error(tmp_path, capsys):
    assert "COCO folder not found" in _fail(tmp_path / "absent", tmp_path / "out", capsys)


def test_compressed_rle_strings_decode_to_pycocotools_runs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((13, 17)) < rng.uniform(0.05, 0.95)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        counts = rle_string_counts(rle["counts"].decode("ascii"), "test")
        assert sum(counts) == mask.size
        decoded = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool).reshape(mask.shape, order="F")
        np.testing.assert_array_equal(decoded, mask)
    with pytest.raises(DatasetError, match="not a compressed COCO RLE string"):
        rle_string_counts("0\x7f", "test")

"""COCOReader through make_reader and open_stage_data on a prepared synthetic COCO set; descriptor and
index validation."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.cli.stage_data import add_dataset_args, open_stage_data
from tools.data.coco import INDEX_FILE, COCOReader
from tools.data.datasets import CAMTestDataset, ClassificationDataset
from tools.data.descriptor import DatasetError, load_descriptor
from tools.data.readers import make_reader
from tools.data.synthetic.coco_writer import coco_file_name, coco_sample, generate_coco_dataset
from tools.data.voc import VOCReader
from tools.prepare_coco import DESCRIPTOR_FILE, main

NUM_CLASSES, NUM_TRAIN, NUM_VAL, SEED = 3, 9, 2, 1
MIN_SIZE, MAX_SIZE = 40, 64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(coco_dir, descriptor path)`` of a prepared synthetic COCO export."""
    coco_dir = generate_coco_dataset(tmp_path_factory.mktemp("coco"), NUM_CLASSES, NUM_TRAIN, NUM_VAL, SEED,
                                     MIN_SIZE, MAX_SIZE, progress=False)
    out_dir = tmp_path_factory.mktemp("prepared")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        main(["--coco_dir", str(coco_dir), "--out", str(out_dir), "--workers", "1"])
    return coco_dir, out_dir / DESCRIPTOR_FILE


@pytest.fixture(scope="module")
def reader(prepared) -> COCOReader:
    return make_reader(load_descriptor(prepared[1]))


SPLIT_OF = {Path(coco_file_name(split, index)).stem: (split, index)
            for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)) for index in range(count)}


def test_make_reader_gives_a_coco_reader_of_images_labels_and_masks(prepared, reader):
    coco_dir, _ = prepared
    assert isinstance(reader, COCOReader) and isinstance(reader, VOCReader)
    assert reader.root == coco_dir.resolve()
    ids = reader.descriptor.read_ids("train") + reader.descriptor.read_ids("val")
    reader.validate(ids)
    for image_id in ids:
        split, index = SPLIT_OF[image_id]
        assert reader.image_path(image_id).name == coco_file_name(split, index)
        sample = coco_sample(SEED, split, index, NUM_CLASSES, MIN_SIZE, MAX_SIZE)
        image = np.asarray(reader.load_image(image_id))
        assert image.shape == sample.image.shape and reader.image_size(image_id) == sample.mask.shape
        assert np.abs(image.astype(int) - sample.image).mean() < 10  # JPEG
        expected = np.zeros(NUM_CLASSES, np.float32)
        expected[np.asarray(sample.labels) - 1] = 1.0
        np.testing.assert_array_equal(reader.load_label(image_id), expected)
        assert reader.read_object_names(image_id) == [reader.descriptor.class_names[c] for c in sample.labels]
        np.testing.assert_array_equal(reader.load_mask(image_id, required=True), sample.mask)
        np.testing.assert_array_equal(reader.load_mask(image_id, aug=True), sample.mask)
        assert reader.mask_path(image_id) == coco_dir.resolve() / "SegmentationClass" / f"{image_id}.png"


def test_stage_datasets_read_coco(reader):
    ids = reader.descriptor.read_ids("train")
    to_tensor = lambda image: torch.from_numpy(np.array(image.resize((32, 32)))).permute(2, 0, 1).float()
    image, label = ClassificationDataset(reader, ids, to_tensor)[0]
    assert image.shape == (3, 32, 32) and label.shape == (NUM_CLASSES,) and label.sum() >= 1
    pair = lambda image, mask: (to_tensor(image), torch.from_numpy(mask).long())
    _, _, mask = CAMTestDataset(reader, ids, pair)[1]
    assert mask.dtype == torch.int64


def test_open_stage_data_with_a_moved_coco_dir(prepared, tmp_path):
    coco_dir, descriptor = prepared
    moved = tmp_path / "elsewhere"
    shutil.copytree(coco_dir, moved)
    parser = argparse.ArgumentParser()
    add_dataset_args(parser, domain="train_aug")
    args = parser.parse_args(["--dataset", str(descriptor), "--data_dir", str(moved),
                              "--experiments_dir", str(tmp_path / "experiments")])
    data = open_stage_data(args)
    assert isinstance(data.reader, COCOReader) and data.reader.root == moved
    assert data.ids == load_descriptor(descriptor).read_ids("train")
    assert data.reader.image_path(data.ids[0]).is_relative_to(moved)
    data.reader.validate(data.ids)
    assert data.reader.load_mask(data.ids[0], required=True).shape == data.reader.image_size(data.ids[0])


def test_unknown_ids_and_missing_photos_are_errors_naming_the_file(prepared, reader, tmp_path):
    with pytest.raises(DatasetError, match=f"{INDEX_FILE}: id 'COCO_train2014_999999999999' is not in the index"):
        reader.load_label("COCO_train2014_999999999999")
    moved = tmp_path / "moved"
    shutil.copytree(prepared[0], moved)
    image_id = reader.descriptor.read_ids("val")[0]
    (moved / "val2014" / f"{image_id}.jpg").unlink()
    other = make_reader(reader.descriptor, moved)
    with pytest.raises(DatasetError, match=f"val2014/{image_id}.jpg: image of id '{image_id}' is missing"):
        other.validate(reader.descriptor.read_ids("val"))


def _descriptor(tmp_path: Path, **changes: object) -> Path:
    content = {"class_names": ["background", "disc"], "layout": "coco", "index_file": INDEX_FILE,
               "data_dir": str(tmp_path), "lists": {"train": "train.txt"}, **changes}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({key: value for key, value in content.items() if value is not None}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"layout": "yolo"}, "'layout' must be one of 'voc', 'coco', got 'yolo'"),
    ({"index_file": None}, "layout 'coco' needs 'index_file'"),
    ({"index_file": 3}, "'index_file' must be a string, got 3"),
])
def test_bad_descriptor_keys(tmp_path, changes, message):
    with pytest.raises(DatasetError, match=message):
        load_descriptor(_descriptor(tmp_path, **changes))


def test_voc_stays_the_default_layout(tmp_path):
    descriptor = load_descriptor(_descriptor(tmp_path, layout=None, index_file=None))
    assert descriptor.layout == "voc" and descriptor.index_file is None
    assert type(make_reader(descriptor)) is VOCReader


@pytest.mark.parametrize("index, message", [
    (None, "index file not found"),
    ("[1, 2]", "an index is a JSON object"),
    ("{", "not valid JSON"),
    ({"a": {"file": "train2014/a.jpg", "labels": [2]}}, "id 'a': 'labels' must list distinct class ids in 1..1"),
    ({"a": {"file": "train2014/a.jpg", "labels": [1, 1]}}, "'labels' must list distinct class ids"),
    ({"a": {"file": "../a.jpg", "labels": [1]}}, "'file' must be a path inside the dataset root"),
    ({"a": {"labels": [1]}}, "an entry is"),
    ({"../a": {"file": "train2014/a.jpg", "labels": [1]}}, "is not a plain file name"),
])
def test_bad_index_files(tmp_path, index, message):
    descriptor = load_descriptor(_descriptor(tmp_path))
    if index is not None:
        (tmp_path / INDEX_FILE).write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(DatasetError, match=message):
        make_reader(descriptor)

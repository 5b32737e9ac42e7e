"""The synthetic VOC-layout dataset: layout, determinism, label/mask consistency, difficulty."""
from __future__ import annotations

import hashlib
import itertools
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from core.conventions import IGNORE_INDEX
from tools.cli.arguments import UsageError
from tools.data.descriptor import load_descriptor
from tools.data.synthetic.coco_writer import COCO_CATEGORY_IDS
from tools.data.synthetic.render import (CLASS_SPECS, HUE_SPREAD, MAX_CLASSES, MIN_VISIBLE_FRACTION, render_sample,
                                         sample_rng)
from tools.data.synthetic.statistics import dataset_statistics
from tools.data.synthetic.voc_writer import generate_dataset
from tools.data.voc import VOCReader
from tools.synthetic import main

NUM_CLASSES, NUM_TRAIN, NUM_VAL = 4, 12, 4
MIN_SIZE, MAX_SIZE = 64, 128
SAMPLE_COUNT = 60
VOC_CLASSES, VOC_MIN_SIZE, VOC_MAX_SIZE = 20, 375, 500  # the VOC-like set of the README
# sha256 over image.tobytes() + mask.tobytes() of render_sample(sample_rng(seed, split, i), num_classes, 96, 192)
# for i in order (the demo's numbers rest on these images): (num_classes, split, indices) -> digest. 6 classes,
# seed 0, 96-192 px are the defaults. Computed at 0c8d448, before classes 13-20 existed; the 6-class train
# digest again when the cross's hue moved from 232 to 300 (its first four train images hold a cross).
REFERENCE_DIGESTS = {
    (6, "train", range(4)): "45f33a5db54e7fa0fb5ff1848829236b17eb1b6598d6efaf514c2cd276b00633",
    (6, "val", range(2)): "3793297ece57b9d97ac1bd4cf4313537f3494268ccf8221fe9abd7d83ed9d181",
    (12, "train", range(4)): "c7d799bc563d1899025fc7a2d2c65868a97bdf31508a0db57909dc387ffd51b8",
}


def _generate(root: Path, seed: int = 0) -> Path:
    return generate_dataset(
        root, NUM_CLASSES, NUM_TRAIN, NUM_VAL, seed=seed, min_size=MIN_SIZE, max_size=MAX_SIZE, progress=False
    )


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    _generate(root)
    return root


@pytest.fixture(scope="module")
def reader(dataset: Path) -> VOCReader:
    return VOCReader(load_descriptor(dataset / "dataset.json"))


@pytest.fixture(scope="module")
def samples() -> list:
    return [render_sample(sample_rng(1, "train", index), 6) for index in range(SAMPLE_COUNT)]


def _all_ids(reader: VOCReader) -> list[str]:
    return reader.descriptor.read_ids("train_aug") + reader.descriptor.read_ids("val")


def test_layout_and_lists(dataset: Path, reader: VOCReader) -> None:
    descriptor = reader.descriptor
    assert descriptor.class_names[0] == "background"
    assert descriptor.num_foreground == NUM_CLASSES
    assert reader.root == dataset.resolve()
    train_aug, train, val = (descriptor.read_ids(domain) for domain in ("train_aug", "train", "val"))
    assert len(train_aug) == NUM_TRAIN and len(val) == NUM_VAL
    assert train == train_aug[: NUM_TRAIN // 4]
    assert not set(val) & set(train_aug)
    assert train_aug[3] == "syn_train_000003" and val[2] == "syn_val_000002"
    for image_id in train_aug + val:
        for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml"),
                               ("SegmentationClass", ".png"), ("SegmentationClassAug", ".png")):
            assert (dataset / folder / f"{image_id}{suffix}").is_file(), (folder, image_id)
    assert not list(dataset.rglob("*.tmp")), "temporary files left behind"
    reader.validate(train_aug + val)


def test_labels_equal_mask_classes(reader: VOCReader) -> None:
    sizes = set()
    for image_id in _all_ids(reader):
        mask = reader.load_mask(image_id, required=True)
        aug_mask = reader.load_mask(image_id, aug=True, required=True)
        np.testing.assert_array_equal(mask, aug_mask)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(NUM_CLASSES + 1)) | {IGNORE_INDEX}, (image_id, values)
        assert IGNORE_INDEX in values, image_id
        present = sorted(values - {0, IGNORE_INDEX})
        label = reader.load_label(image_id)
        assert label.shape == (NUM_CLASSES,)
        assert (np.flatnonzero(label) + 1).tolist() == present, image_id
        assert present, f"{image_id} has no object"
        height, width = reader.image_size(image_id)
        assert mask.shape == (height, width)
        assert reader.load_image(image_id).size == (width, height)
        assert MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE
        sizes.add((width, height))
    assert len(sizes) > 1, "image sizes do not vary"


def test_boxes_are_visible_extent(dataset: Path, reader: VOCReader) -> None:
    multi_object_images = 0
    for image_id in _all_ids(reader):
        mask = reader.load_mask(image_id, required=True)
        root = ElementTree.parse(dataset / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("filename") == f"{image_id}.jpg"
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == mask.shape[::-1]
        objects = root.findall("object")
        multi_object_images += len(objects) > 1
        covered = np.zeros_like(mask, dtype=bool)
        for element in objects:
            class_index = reader.class_index[element.findtext("name")] + 1
            assert element.findtext("difficult") == "0"
            xmin, ymin, xmax, ymax = (int(element.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
            inside = mask[ymin - 1 : ymax, xmin - 1 : xmax]  # VOC boxes are 1-based and inclusive
            assert np.any(inside == class_index), (image_id, element.findtext("name"))
            covered[ymin - 1 : ymax, xmin - 1 : xmax] |= True
        assert not np.any((mask != 0) & (mask != IGNORE_INDEX) & ~covered), f"{image_id}: labelled pixels outside boxes"
    assert multi_object_images > 0


def test_same_seed_same_bytes_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _generate(again)
    assert _all_files(again) == _all_files(dataset)
    other = tmp_path / "other"
    _generate(other, seed=1)
    first = "JPEGImages/syn_train_000000.jpg"
    assert _all_files(other)[first] != _all_files(dataset)[first]


def test_occlusion_hides_objects_in_masks(samples: list) -> None:
    occluded = 0
    for sample in samples:
        for obj in sample.objects:
            assert obj.visible_pixels <= obj.in_frame_pixels <= obj.full_pixels
            if obj.visible_pixels < MIN_VISIBLE_FRACTION * obj.full_pixels:
                assert not obj.kept
            if obj.kept and obj.occluded_pixels > 0.1 * obj.in_frame_pixels:
                occluded += 1
        for class_index in range(1, 7):
            kept = [obj for obj in sample.kept_objects if obj.class_index == class_index]
            labelled = int((sample.mask == class_index).sum())
            assert labelled <= sum(obj.visible_pixels for obj in kept)
            assert (labelled > 0) == bool(kept)
    assert occluded >= 3, "objects are almost never partially hidden"
    assert any(len(sample.kept_objects) > 1 for sample in samples)
    assert any(obj.truncated for sample in samples for obj in sample.kept_objects)


def test_ignore_band_is_thin_and_on_boundaries(samples: list) -> None:
    for sample in samples:
        mask = sample.mask
        foreground = (mask != 0) & (mask != IGNORE_INDEX)
        band = mask == IGNORE_INDEX
        # every labelled object pixel next to background crosses the band first
        assert not np.any(foreground[:, 1:] & (mask[:, :-1] == 0))
        assert not np.any(foreground[1:, :] & (mask[:-1, :] == 0))
        assert band.sum() < 0.5 * (band.sum() + foreground.sum())


def test_distractors_are_drawn_but_labelled_background(samples: list) -> None:
    differences = []
    for sample in samples:
        pixels = sample.distractor_pixels
        assert set(np.unique(sample.mask[pixels]).tolist()) <= {0, IGNORE_INDEX}
        if pixels.any():
            change = np.abs(sample.image.astype(int) - sample.background.astype(int)).sum(axis=2)
            differences.append(change[pixels].mean())
    assert len(differences) > 0.8 * len(samples)
    assert np.median(differences) > 30, "distractors are indistinguishable from the background"


def test_every_class_renders(tmp_path: Path) -> None:
    seen = set()
    for index in range(80):
        sample = render_sample(sample_rng(2, "val", index), MAX_CLASSES, 48, 64)
        seen |= {obj.class_index for obj in sample.kept_objects}
        assert sample.image.shape == sample.mask.shape + (3,)
    assert seen == set(range(1, MAX_CLASSES + 1))


def test_images_of_up_to_twelve_classes_are_those_of_main() -> None:
    for (num_classes, split, indices), expected in REFERENCE_DIGESTS.items():
        digest = hashlib.sha256()
        for index in indices:
            sample = render_sample(sample_rng(0, split, index), num_classes, 96, 192)
            digest.update(sample.image.tobytes())
            digest.update(sample.mask.tobytes())
        assert digest.hexdigest() == expected, (num_classes, split)


def test_twenty_classes_no_two_alike() -> None:
    """A VOC-sized label set; each class its own shape, and two classes that share a texture never
    share a hue range (so shape, colour and texture together tell every pair apart)."""
    assert MAX_CLASSES >= VOC_CLASSES
    assert len({spec.name for spec in CLASS_SPECS}) == MAX_CLASSES
    for first, second in itertools.combinations(CLASS_SPECS, 2):
        hue_gap = abs((first.hue - second.hue + 180.0) % 360.0 - 180.0)
        assert first.texture != second.texture or hue_gap > 2 * HUE_SPREAD, (first.name, second.name)
    assert len(COCO_CATEGORY_IDS) == MAX_CLASSES and list(COCO_CATEGORY_IDS) == sorted(set(COCO_CATEGORY_IDS))


def test_voc_sized_twenty_class_set_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "voc_like"
    main(["--out", str(root), "--num_classes", str(VOC_CLASSES), "--num_train", "2", "--num_val", "1",
          "--min_size", str(VOC_MIN_SIZE), "--max_size", str(VOC_MAX_SIZE), "--seed", "3"])
    assert f"{VOC_CLASSES} classes" in capsys.readouterr().out
    descriptor = load_descriptor(root / "dataset.json")
    assert descriptor.class_names == ("background", *(spec.name for spec in CLASS_SPECS[:VOC_CLASSES]))
    reader = VOCReader(descriptor)
    for image_id in _all_ids(reader):
        height, width = reader.image_size(image_id)
        assert VOC_MIN_SIZE <= min(height, width) and max(height, width) <= VOC_MAX_SIZE
        values = set(np.unique(reader.load_mask(image_id, required=True)).tolist())
        assert values - {0, IGNORE_INDEX} and values <= set(range(VOC_CLASSES + 1)) | {IGNORE_INDEX}


def test_statistics_match_the_files(dataset: Path, reader: VOCReader) -> None:
    statistics = dataset_statistics(dataset)
    assert statistics["class_names"] == list(reader.descriptor.class_names)
    for domain, split in statistics["splits"].items():
        ids = reader.descriptor.read_ids(domain)
        objects = [len(reader.read_object_names(image_id)) for image_id in ids]
        labels = np.stack([reader.load_label(image_id) for image_id in ids])
        assert split["images"] == split["masks"] == len(ids)
        assert split["objects_per_image"] == {"mean": pytest.approx(np.mean(objects)),
                                              "min": min(objects), "max": max(objects)}
        assert 1 <= split["objects_per_image"]["min"] <= split["objects_per_image"]["max"] <= 3
        assert list(split["images_per_class"].values()) == labels.sum(0).astype(int).tolist()
        fractions = split["pixel_fraction"]
        assert sum(fractions.values()) == pytest.approx(1.0)
        assert fractions["ignore"] > 0 and fractions["background"] > 0.3
        assert MIN_SIZE <= split["width"]["min"] <= split["width"]["max"] <= MAX_SIZE


def test_command_line_num_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "three"
    main(["--out", str(root), "--num_classes", "3", "--num_train", "3", "--num_val", "2", "--max_size", "100"])
    descriptor = load_descriptor(root / "dataset.json")
    assert descriptor.class_names == ("background", "disc", "square", "triangle")
    assert descriptor.read_ids("train") == ["syn_train_000000"]
    printed = capsys.readouterr().out
    assert "images per class" in printed and "[val] 2 images" in printed
    main(["--stats", str(root)])
    assert capsys.readouterr().out == printed
    with pytest.raises(UsageError, match=rf"--num_classes must be in 1\.\.{MAX_CLASSES}, got 21$"):  # exit status 2
        main(["--out", str(tmp_path / "bad"), "--num_classes", "21"])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main([])

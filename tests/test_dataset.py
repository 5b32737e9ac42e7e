"""VOC reader: labels from XML, masks, stage datasets and the clear errors on bad input."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.voc_layout import CLASS_NAMES, make_voc_layout, write_mask, write_xml
from tools.data.datasets import AffinityDataset, CAMMakingDataset, CAMTestDataset, ClassificationDataset
from tools.data.descriptor import DatasetError, load_descriptor, read_id_list
from tools.data.voc import VOCReader

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny(tmp_path):
    descriptor = load_descriptor(make_voc_layout(tmp_path))
    return tmp_path, descriptor, VOCReader(descriptor)


def test_descriptor_of_voc_lists_21_classes_and_the_official_lists():
    descriptor = load_descriptor(REPO / "data" / "voc12" / "dataset.json")
    assert descriptor.num_classes == 21 and descriptor.num_foreground == 20
    assert descriptor.class_names[15] == "person"
    assert len(descriptor.read_ids("train")) == 1464
    assert len(descriptor.read_ids("train_aug")) == 10582
    assert len(descriptor.read_ids("val")) == 1449
    assert set(descriptor.read_ids("train")) <= set(descriptor.read_ids("train_aug"))
    assert not set(descriptor.read_ids("val")) & set(descriptor.read_ids("train_aug"))
    assert tuple(descriptor.palette[15]) == (192, 128, 128)


def test_reader_labels_masks_and_sizes(tiny):
    root, descriptor, reader = tiny
    ids = descriptor.read_ids("train")
    for index, image_id in enumerate(ids):
        label = reader.load_label(image_id)
        expected = np.zeros(len(CLASS_NAMES) - 1, np.float32)
        expected[index % 3] = 1
        np.testing.assert_array_equal(label, expected)
        mask = reader.load_mask(image_id)
        assert mask.shape == reader.image_size(image_id)
        assert set(np.unique(mask)) == {0, 1 + index % 3, 255}
    assert reader.load_mask("2007_000000", aug=True) is None


def test_xml_rules_difficult_duplicates_and_degenerate_boxes(tiny):
    root, _, reader = tiny
    write_xml(root / "Annotations" / "2007_000000.xml", (56, 40), [
        ("cat", (1, 1, 10, 10)), ("cat", (5, 5, 20, 20)),  # duplicates count once
        ("dog", (60.7, 3, 80, 9)),                          # clamped to an empty box: dropped
        ("car", ("12.9", 3, 30, 9)),
    ])
    np.testing.assert_array_equal(reader.load_label("2007_000000"), [1, 0, 1])


def test_stage_datasets(tiny):
    root, descriptor, reader = tiny
    ids = descriptor.read_ids("train")
    to_tensor = lambda image: torch.from_numpy(np.array(image.resize((32, 32)))).permute(2, 0, 1).float()
    image, label = ClassificationDataset(reader, ids, to_tensor)[1]
    assert image.shape == (3, 32, 32) and label.tolist() == [0, 1, 0]
    with_box = ClassificationDataset(reader, ids, lambda image: (to_tensor(image), torch.tensor([0, 0, 5, 5])))
    assert len(with_box[0]) == 3
    pair = lambda image, mask: (to_tensor(image), torch.from_numpy(mask).long())
    image, label, mask = CAMTestDataset(reader, ids, pair)[2]
    assert mask.dtype == torch.int64 and mask.shape == (56, 56)
    image_id, keys, size, inputs = CAMMakingDataset(reader, ids, (1.0, 0.5), patch_size=16)[1]
    assert image_id == ids[1] and keys.tolist() == [0, 2] and size == (48, 56)
    assert [tuple(scaled.shape) for scaled in inputs] == [(3, 48, 64), (3, 32, 32)]  # multiples of 16
    affinity_dir = root / "aff"
    affinity_dir.mkdir()
    write_mask(affinity_dir / f"{ids[0]}.png", np.full((40, 56), 255, np.uint8))
    image, aff = AffinityDataset(reader, ids, affinity_dir, pair)[0]
    assert int(aff.max()) == 255


@pytest.mark.parametrize("breakage, message", [
    ("missing_image", "image of id '2007_000001' is missing"),
    ("missing_xml", "annotation of id '2007_000001' is missing"),
    ("bad_jpeg", "unreadable image"),
    ("bad_png", "unreadable mask PNG"),
    ("mask_size", "differs from the image's"),
    ("unknown_class", "unknown class name 'unicorn'"),
])
def test_bad_input_gives_a_clear_error_naming_the_file(tiny, breakage, message):
    root, descriptor, reader = tiny
    image_id = "2007_000001"
    jpeg = root / "JPEGImages" / f"{image_id}.jpg"
    xml = root / "Annotations" / f"{image_id}.xml"
    png = root / "SegmentationClass" / f"{image_id}.png"
    if breakage == "missing_image":
        jpeg.unlink()
        call, path = (lambda: reader.validate(descriptor.read_ids("train"))), jpeg
    elif breakage == "missing_xml":
        xml.unlink()
        call, path = (lambda: reader.load_label(image_id)), xml
    elif breakage == "bad_jpeg":
        jpeg.write_bytes(b"\xff\xd8 not a jpeg")
        call, path = (lambda: reader.load_image(image_id)), jpeg
    elif breakage == "bad_png":
        png.write_bytes(b"\x89PNG broken")
        call, path = (lambda: reader.load_mask(image_id)), png
    elif breakage == "mask_size":
        write_mask(png, np.zeros((10, 10), np.uint8))
        call, path = (lambda: reader.load_mask(image_id)), png
    else:
        write_xml(xml, (56, 48), [("unicorn", (1, 1, 9, 9))])
        call, path = (lambda: reader.load_label(image_id)), xml
    with pytest.raises(DatasetError) as error:
        call()
    assert message in str(error.value) and str(path) in str(error.value)


def test_empty_list_and_unknown_domain(tiny, tmp_path):
    root, descriptor, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="list file is empty"):
        read_id_list(empty)
    with pytest.raises(DatasetError, match="no list file for domain 'val'"):
        descriptor.read_ids("val")


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared VOC sample not present")
def test_real_voc_masks_decode_to_class_indices_and_match_their_photos():
    descriptor = load_descriptor(REPO / "data" / "voc12" / "dataset.json")
    reader = VOCReader(descriptor, data_dir=SAMPLE)
    for image_id in read_id_list(SAMPLE / "ids_jpeg.txt"):
        mask = reader.load_mask(image_id, required=True)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(21)) | {255} and 255 in values and len(values) >= 3
        assert mask.shape == np.asarray(reader.load_image(image_id)).shape[:2]

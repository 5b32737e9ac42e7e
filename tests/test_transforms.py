"""Transforms: shapes, crop boxes, image/mask alignment, resize ranges, normalisation, seeding."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from tools.data import transforms as T

# Label -> RGB colour of the synthetic images, so a transformed pixel's colour names its label.
PALETTE = {0: (200, 30, 30), 1: (30, 200, 30), 2: (30, 30, 200), 3: (200, 200, 30), 7: (30, 200, 200), 255: (250, 250, 250)}
LABELS = np.array(sorted(PALETTE))
COLOURS = np.array([PALETTE[label] for label in LABELS])
MEAN = np.array(T.IMAGENET_MEAN)[:, None, None]
STD = np.array(T.IMAGENET_STD)[:, None, None]


def labelled_image(height: int, width: int, block: int = 8, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """Blocks of random labels (255 included) and the image that paints each label in its colour."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(LABELS, (height // block + 1, width // block + 1))
    mask = np.kron(blocks, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    image = np.zeros((height, width, 3), np.uint8)
    for label, colour in PALETTE.items():
        image[mask == label] = colour
    return Image.fromarray(image), mask


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Inverse of the normalisation: ``(3, H, W)`` float -> ``(3, H, W)`` rounded RGB values."""
    return np.rint((image.double().numpy() * STD + MEAN) * 255).astype(np.int64)


def decode(image: torch.Tensor) -> np.ndarray:
    """Label of the palette colour nearest to each pixel, 255 for padding (all channels exactly 0)."""
    rgb = to_uint8(image).transpose(1, 2, 0)
    labels = LABELS[np.abs(rgb[:, :, None, :] - COLOURS).sum(-1).argmin(-1)]
    labels[(image == 0).all(0).numpy()] = 255
    return labels


def is_padding(image: torch.Tensor) -> np.ndarray:
    return (image == 0).all(0).numpy()


# ----------------------------------------------------------------------------- shapes and dtypes
SIZES = [(150, 220), (700, 500)]  # non-square, smaller and larger than every crop


@pytest.mark.parametrize("size", SIZES)
def test_every_builder_output_shape_and_dtype(size):
    torch.manual_seed(0)
    image, mask = labelled_image(*size)
    expected = {
        "caae_eval": ((3, 224, 224), (224, 224)),
        "semformer_eval": ((3, 448, 448), (448, 448)),
        "affinity": ((3, 512, 512), (128, 128)),
        "segmentation": ((3, 321, 321), (321, 321)),
    }
    outputs = {
        "caae_eval": T.caae_eval_transform()(image, mask),
        "semformer_eval": T.semformer_eval_transform()(image, mask),
        "affinity": T.affinity_train_transform()(image, mask),
        "segmentation": T.segmentation_train_transform()(image, mask),
    }
    for name, (image_out, mask_out) in outputs.items():
        assert type(image_out) is torch.Tensor and type(mask_out) is torch.Tensor, name
        assert (tuple(image_out.shape), tuple(mask_out.shape)) == expected[name], name
        assert image_out.dtype == torch.float32 and mask_out.dtype == torch.int64, name
    for expand in [(1.0, 3.0), None]:
        caae = T.caae_train_transform(expand=expand)(image)
        assert caae.shape == (3, 224, 224) and caae.dtype == torch.float32
    semformer, box = T.semformer_train_transform()(image)
    assert semformer.shape == (3, 448, 448) and semformer.dtype == torch.float32
    assert box.shape == (4,) and box.dtype == torch.int64
    assert T.normalize(image).shape == (3, *size)


def test_builders_are_picklable_for_dataloader_workers():
    image, mask = labelled_image(40, 60)
    transform = pickle.loads(pickle.dumps(T.affinity_train_transform(32, 20, 40)))
    assert transform(image, mask)[1].shape == (8, 8)


# ----------------------------------------------------------------------------- crop box
@pytest.mark.parametrize("size", [(40, 50), (60, 90), (90, 100)])
def test_crop_box_marks_exactly_the_non_padding_region(size):
    """No resize (min = max = long side), so the box content is the normalised source, maybe flipped."""
    height, width = size
    source = random_image(height, width)
    reference = T.normalize(source)
    transform = T.semformer_train_transform(64, max(size), max(size), color_jitter=False)
    torch.manual_seed(1)
    for _ in range(10):
        image, box = transform(source)
        xmin, ymin, xmax, ymax = box.tolist()
        assert (xmax - xmin, ymax - ymin) == (min(width, 64), min(height, 64))
        inside = np.zeros((64, 64), bool)
        inside[ymin:ymax, xmin:xmax] = True
        np.testing.assert_array_equal(is_padding(image), ~inside)
        content = image[:, ymin:ymax, xmin:xmax]
        windows = [
            candidate[:, y : y + ymax - ymin, x : x + xmax - xmin]
            for candidate in (reference, reference.flip(-1))
            for y in range(height - (ymax - ymin) + 1)
            for x in range(width - (xmax - xmin) + 1)
        ]
        assert any(torch.equal(content, window) for window in windows)


def test_crop_offsets_cover_both_ends():
    """Canvas offsets of a small image and image offsets of a large one reach 0 and the maximum."""
    crop = T.RandomCropOrPad(10)
    torch.manual_seed(0)
    small = {tuple(crop(tv_tensors.Image(torch.ones(3, 7, 7)), _extent(7, 7))[1][0].tolist()[:2]) for _ in range(200)}
    assert {x for x, _ in small} == {0, 1, 2, 3} and {y for _, y in small} == {0, 1, 2, 3}
    ramp = tv_tensors.Image(torch.arange(13.0).repeat(1, 13, 1))
    starts = {int(crop(ramp)[0, 0, 0]) for _ in range(200)}
    assert starts == set(range(4))


def _extent(height: int, width: int) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes([[0, 0, width, height]], format="XYXY", canvas_size=(height, width))


def test_crop_rejects_pil_input():
    with pytest.raises(TypeError, match="after normalisation"):
        T.RandomCropOrPad(8)(random_image(10, 10))


# ----------------------------------------------------------------------------- image / mask alignment
@pytest.mark.parametrize("size", [(30, 50), (70, 45), (80, 100)])
def test_masks_follow_flip_and_crop_exactly(size):
    image, mask = labelled_image(*size, block=4)
    long_side = max(size)
    transforms = [
        T.segmentation_train_transform(64, scales=(1.0,)),
        T.affinity_train_transform(64, long_side, long_side, label_stride=1, color_jitter=False),
    ]
    torch.manual_seed(2)
    for transform in transforms:
        for _ in range(8):
            image_out, mask_out = transform(image, mask)
            np.testing.assert_array_equal(decode(image_out), mask_out.numpy())
            assert set(np.unique(mask_out.numpy())) <= set(LABELS)


@pytest.mark.parametrize("size", [(150, 220), (500, 380)])
def test_masks_stay_aligned_through_resizes(size):
    """Bicubic images blur the block edges; nearest masks must still agree almost everywhere."""
    image, mask = labelled_image(*size, block=16)
    torch.manual_seed(3)
    for _ in range(4):
        for transform in (
            T.segmentation_train_transform(256, scales=(0.5, 1.0, 2.0)),
            T.affinity_train_transform(256, 128, 512, label_stride=1, color_jitter=False),
        ):
            image_out, mask_out = transform(image, mask)
            assert set(np.unique(mask_out.numpy())) <= set(LABELS)
            assert (decode(image_out) == mask_out.numpy()).mean() > 0.95
    image_out, mask_out = T.caae_eval_transform(96)(image, mask)
    assert set(np.unique(mask_out.numpy())) <= set(LABELS)
    assert (decode(image_out) == mask_out.numpy()).mean() > 0.95


def test_flip_mirrors_image_and_mask_together():
    image, mask = labelled_image(32, 32, block=4)
    transform = T.segmentation_train_transform(32, scales=(1.0,))
    torch.manual_seed(4)
    seen = set()
    for _ in range(20):
        image_out, mask_out = transform(image, mask)
        np.testing.assert_array_equal(decode(image_out), mask_out.numpy())
        if np.array_equal(mask_out.numpy(), mask):
            seen.add("kept")
        elif np.array_equal(mask_out.numpy(), mask[:, ::-1]):
            seen.add("flipped")
    assert seen == {"kept", "flipped"}


def test_semformer_eval_crops_top_left_and_pads_image_0_mask_255():
    image, mask = labelled_image(40, 70)
    image_out, mask_out = T.semformer_eval_transform(50)(image, mask)
    torch.testing.assert_close(image_out[:, :40, :], T.normalize(image)[:, :, :50], rtol=0, atol=0)
    assert (image_out[:, 40:] == 0).all()
    np.testing.assert_array_equal(mask_out[:40].numpy(), mask[:, :50])
    assert (mask_out[40:] == 255).all()


def test_affinity_label_keeps_pixel_4i_plus_2():
    rows = np.repeat(np.arange(32, dtype=np.uint8)[:, None], 32, 1)
    image = random_image(32, 32)
    transform = T.affinity_train_transform(32, 32, 32, label_stride=4)
    torch.manual_seed(5)
    for _ in range(4):
        label = transform(image, rows)[1].numpy()
        np.testing.assert_array_equal(label, np.repeat((4 * np.arange(8) + 2)[:, None], 8, 1))
        columns = transform(image, rows.T.copy())[1].numpy()
        assert np.array_equal(columns, rows[2::4, 2::4].T) or np.array_equal(columns, 31 - rows[2::4, 2::4].T)


def test_downsample_matches_pil_nearest_512_to_128():
    mask = np.random.default_rng(6).integers(0, 256, (512, 512), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(mask).resize((128, 128), Image.NEAREST))
    output = T.DownsampleMask(4)(tv_tensors.Mask(torch.from_numpy(mask)))
    np.testing.assert_array_equal(output.numpy(), expected)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="multiple"):
        T.affinity_train_transform(crop_size=30, label_stride=4)
    with pytest.raises(ValueError, match="min_size"):
        T.RandomResizeLongSide(10, 5)
    with pytest.raises(ValueError, match="mask shape"):
        T.segmentation_train_transform()(random_image(10, 12), np.zeros((12, 10), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        T.normalize(Image.new("L", (4, 4)))


# ----------------------------------------------------------------------------- resizes
@pytest.mark.parametrize("size", [(30, 40), (40, 30), (35, 35)])
def test_random_resize_long_side_range_and_inclusive_ends(size):
    image = random_image(*size)
    resize = T.RandomResizeLongSide(10, 13)
    torch.manual_seed(7)
    long_sides = set()
    for _ in range(100):
        output = resize(image)
        assert isinstance(output, Image.Image)
        long_sides.add(max(output.size))
        ratio = size[1] / size[0]
        assert abs(output.width / output.height - ratio) < 0.15
    assert long_sides == {10, 11, 12, 13}


def test_random_resize_is_pil_bicubic_and_skips_unchanged_size():
    image = random_image(30, 40)
    torch.manual_seed(8)
    output = T.RandomResizeLongSide(20, 20)(image)
    assert np.array_equal(np.asarray(output), np.asarray(image.resize((20, 15), Image.BICUBIC)))
    assert T.RandomResizeLongSide(40, 40)(image) is image


def test_random_expand_scales_both_sides_by_one_factor():
    image = random_image(30, 40)
    expand = T.RandomExpand((1.0, 3.0))
    torch.manual_seed(9)
    sizes = [expand(image).size for _ in range(50)]
    assert all(40 <= w <= 120 and 30 <= h <= 90 and abs(w / 40 - h / 30) < 0.05 for w, h in sizes)
    assert len(set(sizes)) > 10


# ----------------------------------------------------------------------------- normalisation and seeding
def test_normalize_matches_the_formula():
    pixels = np.random.default_rng(10).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    expected = ((pixels / 255.0 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)).transpose(2, 0, 1)
    for given in (pixels, Image.fromarray(pixels)):
        output = T.normalize(given)
        assert output.dtype == torch.float32 and output.shape == (3, 9, 13)
        np.testing.assert_allclose(output.numpy(), expected, atol=1e-6)


def test_seeded_runs_repeat_and_seeds_differ():
    image, mask = labelled_image(120, 90)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [
            T.caae_train_transform(64)(image),
            *T.semformer_train_transform(64, 48, 160)(image),
            *T.affinity_train_transform(64, 48, 160)(image, mask),
            *T.segmentation_train_transform(64, (0.5, 1.5), "uniform")(image, mask),
        ]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))

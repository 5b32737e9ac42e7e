"""The synthetic dataset in MS COCO 2014's layout (for ``tools.prepare_coco``), written under ``out_dir``::

    train2014/COCO_train2014_<image id, 12 digits>.jpg, val2014/...
    annotations/instances_train2014.json, instances_val2014.json

with category ids that have gaps, polygons, compressed and uncompressed RLEs, crowd regions, objects
whose annotations overlap (the smaller drawn on top) and images without annotations. There is no ignore
band; ``coco_sample`` gives an image's ground truth mask (crowd regions 255).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from core.conventions import IGNORE_INDEX
from tools.artifacts.files import atomic_write_bytes, atomic_write_text
from tools.data.synthetic.render import (CLASS_SPECS, COVERAGE_THRESHOLD, DISTRACTOR_COUNT_RANGE,
                                         OBJECT_COUNT_PROBABILITIES, PHOTO_NOISE, SPLIT_SEEDS, Layer, background_photo,
                                         check_arguments, check_classes, composite, distractor_layer, jpeg_bytes,
                                         object_layer, overlap, sample_rng, to_uint8)

COCO_SPLIT_FOLDERS = {"train": "train2014", "val": "val2014"}
# Category ids with gaps, as COCO's 1..90, in class order (prepare_coco numbers categories in id order);
# classes 13-20 take ids past COCO's 90.
COCO_CATEGORY_IDS = (1, 3, 4, 8, 13, 15, 20, 27, 31, 44, 46, 90, 91, 95, 102, 117, 130, 144, 163, 181)
COCO_IMAGE_ID_STRIDE = 3
ANNOTATION_ID_BLOCK = 10  # the annotations of image i have ids i * 10 + 0..9
UNANNOTATED_PERIOD = 8  # images 7, 15, ... of a split show no object and have no annotation
CROWD_PERIOD = 3  # images 1, 4, ... (annotated ones) have a crowd region
CROWD_MEMBER_RANGE = (3, 5)
CROWD_DIAMETER_RANGE = (0.12, 0.25)  # crowd members, fraction of the short side
COCO_PIXEL_CENTRE = 0.5  # COCO polygons centre pixel (x, y) on (x + 0.5, y + 0.5), cv2 on (x, y)
POLYGON_DECIMALS = 2  # as in COCO's JSON



@dataclass
class CocoAnnotation:
    """One instance annotation: class ``1..K``, crowd flag, COCO ``segmentation`` JSON (polygons, compressed
    or uncompressed RLE) and the mask it decodes to, ``(H, W)`` bool."""

    annotation_id: int
    class_index: int
    iscrowd: bool
    segmentation: list | dict
    mask: np.ndarray

    def as_json(self, image_id: int) -> dict:
        """The entry of ``instances_*.json``: area and box of the decoded mask, as COCO's."""
        rle = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {
            "id": self.annotation_id,
            "image_id": image_id,
            "category_id": COCO_CATEGORY_IDS[self.class_index - 1],
            "segmentation": self.segmentation,
            "area": float(self.mask.sum()),
            "bbox": [float(value) for value in mask_utils.toBbox(rle)],
            "iscrowd": int(self.iscrowd),
        }


@dataclass
class CocoSample:
    """One image of the COCO export: ``image (H, W, 3)`` uint8, its annotations (crowd first, then the
    objects bottom to top) and the ground truth ``mask (H, W)`` uint8 that ``tools.prepare_coco`` must
    reproduce: 0 background, class ids ``1..K``, 255 on crowd regions no object covers."""

    image: np.ndarray
    mask: np.ndarray
    annotations: list[CocoAnnotation]

    @property
    def labels(self) -> list[int]:
        """Image-level class ids: every annotation's, crowd regions included."""
        return sorted({annotation.class_index for annotation in self.annotations})


def coco_image_id(split: str, index: int) -> int:
    """Image ids step by ``COCO_IMAGE_ID_STRIDE`` and differ between splits, as COCO's."""
    return index * COCO_IMAGE_ID_STRIDE + SPLIT_SEEDS[split] + 1


def coco_file_name(split: str, index: int) -> str:
    """``COCO_train2014_000000000001.jpg``: COCO 2014's naming."""
    return f"COCO_{COCO_SPLIT_FOLDERS[split]}_{coco_image_id(split, index):012d}.jpg"


def _frame_coverage(layer: Layer, height: int, width: int) -> np.ndarray:
    """The pixels a layer claims inside an ``(H, W)`` image (as ``composite`` does), ``(H, W)`` bool."""
    coverage = np.zeros((height, width), bool)
    window = overlap(layer, height, width)
    if window is not None:
        patch, region = window
        coverage[region] = layer.alpha[patch] >= COVERAGE_THRESHOLD
    return coverage


def _compressed_rle(mask: np.ndarray) -> dict:
    """``{"size": [H, W], "counts": "<string>"}`` of an ``(H, W)`` bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths of the column-major ``(H, W)`` bool mask, a background run first."""
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def _polygon_annotation(layer: Layer, annotation_id: int, height: int, width: int) -> CocoAnnotation:
    """The shape's outline as a COCO polygon (it may reach outside the image) and what pycocotools draws."""
    polygons = [np.round(points + COCO_PIXEL_CENTRE, POLYGON_DECIMALS).ravel().tolist()
                for points, _ in layer.contours]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
    return CocoAnnotation(annotation_id, layer.class_index, False, polygons, mask)


def _object_annotation(layer: Layer, number: int, annotation_id: int, height: int, width: int) -> CocoAnnotation:
    """Even-numbered shapes without holes become polygons, the others compressed RLEs of their coverage."""
    if number % 2 == 0 and not layer.has_holes:
        return _polygon_annotation(layer, annotation_id, height, width)
    coverage = _frame_coverage(layer, height, width)
    return CocoAnnotation(annotation_id, layer.class_index, False, _compressed_rle(coverage), coverage)


def render_coco_sample(
    rng: np.random.Generator, num_classes: int, image_id: int, annotated: bool, crowd: bool,
    min_size: int = 96, max_size: int = 192,
) -> CocoSample:
    """Draw one image of the COCO export and annotate it as COCO does.

    Every object gets a polygon or an RLE of its whole in-frame shape, so annotations of overlapping
    objects overlap; a crowd region is one uncompressed RLE over a group of small objects of one class.
    The drawing order is prepare_coco's painting rule: distractors, the crowd, then the objects from the
    largest annotation to the smallest (equal areas: lower annotation id first). Annotation ids are
    shuffled within the image, so their order is not the drawing order. ``annotated=False`` draws only
    the background and distractors.
    """
    check_classes(num_classes)
    width, height = (int(side) for side in rng.integers(min_size, max_size + 1, 2))
    background = background_photo(width, height, rng)
    distractors = [distractor_layer(width, height, rng)
                   for _ in range(int(rng.integers(DISTRACTOR_COUNT_RANGE[0], DISTRACTOR_COUNT_RANGE[1] + 1)))]
    members: list[Layer] = []
    if crowd:
        crowd_class = int(rng.integers(1, num_classes + 1))
        members = [object_layer(CLASS_SPECS[crowd_class - 1], crowd_class, width, height, rng, CROWD_DIAMETER_RANGE)
                   for _ in range(int(rng.integers(CROWD_MEMBER_RANGE[0], CROWD_MEMBER_RANGE[1] + 1)))]
    objects: list[Layer] = []
    if annotated:
        count = int(rng.choice(len(OBJECT_COUNT_PROBABILITIES), p=OBJECT_COUNT_PROBABILITIES)) + 1
        objects = [object_layer(CLASS_SPECS[c - 1], int(c), width, height, rng)
                   for c in rng.integers(1, num_classes + 1, count)]
    ids = image_id * ANNOTATION_ID_BLOCK + rng.permutation(len(objects) + (1 if members else 0))
    crowds = []
    if members:
        region = np.logical_or.reduce([_frame_coverage(layer, height, width) for layer in members])
        crowds = [CocoAnnotation(int(ids[-1]), members[0].class_index, True, _uncompressed_rle(region), region)]
    annotations = [_object_annotation(layer, number, int(ids[number]), height, width)
                   for number, layer in enumerate(objects)]
    order = sorted(range(len(objects)), key=lambda k: (-int(annotations[k].mask.sum()), annotations[k].annotation_id))
    image = background.copy()
    scratch_owner = np.zeros((height, width), np.int16)
    for layer in [*distractors, *members, *(objects[k] for k in order)]:
        composite(image, scratch_owner, layer, 1)
    mask = np.zeros((height, width), np.uint8)
    for annotation in crowds:
        mask[annotation.mask] = IGNORE_INDEX
    drawn = [annotations[k] for k in order]
    for annotation in drawn:
        mask[annotation.mask] = annotation.class_index
    image += rng.normal(0.0, PHOTO_NOISE, image.shape).astype(np.float32)
    return CocoSample(to_uint8(image), mask, crowds + drawn)


def coco_sample(seed: int, split: str, index: int, num_classes: int, min_size: int, max_size: int) -> CocoSample:
    """Image ``index`` of a split of the COCO export: every ``UNANNOTATED_PERIOD``-th shows no object,
    every ``CROWD_PERIOD``-th of the others has a crowd region. Depends only on its arguments."""
    annotated = index % UNANNOTATED_PERIOD != UNANNOTATED_PERIOD - 1
    crowd = annotated and index % CROWD_PERIOD == 1
    return render_coco_sample(sample_rng(seed, split, index), num_classes, coco_image_id(split, index), annotated,
                              crowd, min_size, max_size)


def generate_coco_dataset(
    out_dir: str | Path,
    num_classes: int = 6,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
    progress: bool = True,
) -> Path:
    """Write the set in MS COCO 2014's layout under ``out_dir`` (``train2014/``, ``val2014/``,
    ``annotations/instances_{train,val}2014.json``); returns ``out_dir``. Masks, lists and the
    descriptor are ``tools.prepare_coco``'s to make.

    Categories, images and annotations are listed in descending order, so a reader must sort them.
    """
    check_arguments(num_classes, num_train, num_val, seed, min_size, max_size)
    root = Path(out_dir)
    categories = [{"id": COCO_CATEGORY_IDS[k], "name": CLASS_SPECS[k].name, "supercategory": "shape"}
                  for k in reversed(range(num_classes))]
    for split, count in (("train", num_train), ("val", num_val)):
        folder = COCO_SPLIT_FOLDERS[split]
        images, annotations = [], []
        for index in tqdm(range(count), desc=f"synthetic {folder}", disable=not progress):
            sample = coco_sample(seed, split, index, num_classes, min_size, max_size)
            atomic_write_bytes(root / folder / coco_file_name(split, index), jpeg_bytes(sample.image))
            height, width = sample.mask.shape
            image_id = coco_image_id(split, index)
            images.append({"id": image_id, "file_name": coco_file_name(split, index), "height": height, "width": width})
            annotations.extend(annotation.as_json(image_id) for annotation in sample.annotations)
        content = {"info": {"description": "synthetic shapes in the MS COCO 2014 layout"},
                   "images": images[::-1], "annotations": annotations[::-1], "categories": categories}
        atomic_write_text(root / "annotations" / f"instances_{folder}.json", json.dumps(content) + "\n")
    return root

"""MS COCO 2014 for the pipeline: palette masks, id lists, image-level labels and a COCO-layout descriptor.

    python -m tools.prepare_coco --coco_dir /data/coco2014 [--out data/coco14] [--workers 16]

reads ``<coco_dir>/annotations/instances_{train,val}2014.json`` (photos in ``train2014/``, ``val2014/``)
and writes::

    <coco_dir>/SegmentationClass/<stem>.png  palette PNG: 0 background, 1..80 classes, 255 crowd regions
    <out>/train.txt, val.txt                 stems of the photos with at least one annotation, image-id order
    <out>/image_labels.json                  {stem: {"file": "train2014/<stem>.jpg", "labels": [1..80]}}
    <out>/dataset.json                       descriptor ("layout": "coco"), written last

(82,081 train and 40,137 val images for COCO 2014.) The rules:

- classes: COCO's category ids (1..90 with gaps) in id order become 1..80; 0 is the background.
- masks: pycocotools decodes polygons (clipped to the image) and RLEs. Where annotations overlap, the
  smaller one (decoded pixel area) is on top; equal areas: the higher annotation id. Crowd regions
  (``iscrowd`` 1) are 255 (ignore) wherever no other annotation covers them: an object annotated on its
  own inside a crowd keeps its class.
- labels: the categories of all of an image's annotations, crowd regions included, as COCO's
  image-level labels are usually built (pycocotools' ``getAnnIds(iscrowd=None)``): a crowd region is a
  visible group of its class whose outline is too coarse for a mask, so an image may have a label whose
  pixels are all 255.
- bad input is a one-line error naming the file before any mask is written: a missing or unreadable
  annotation file, a missing key or a value of the wrong type, an unknown image or category id, an RLE
  whose size is not its image's or whose runs do not add up to it, two photos with the same stem.
- warnings, counted, one line per kind naming the first case: a polygon reaching outside its image
  (clipped), a polygon of fewer than 3 points (skipped; an annotation left without a polygon is skipped),
  a photo that is missing (its image is left out of masks, lists and labels).
- a rerun (after a kill, say) skips the masks that exist (``--overwrite`` rewrites them; every file is
  written atomically, so an existing one is complete) and rewrites the other files identically.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from tools.artifacts.files import atomic_write_text, save_png
from tools.artifacts.folders import pending_ids
from tools.artifacts.paths import PNG_SUFFIX
from tools.cli.arguments import StageArgumentParser, positive_int
from tools.cli.exits import run_main
from tools.cli.repository import REPOSITORY
from tools.data.coco import INDEX_FILE, IndexEntry, write_coco_descriptor, write_image_index
from tools.data.descriptor import MAX_LABEL_VALUE, DatasetError, check_image_id, read_json_object, voc_palette
from tools.scoring.parallel import default_jobs, parallel_map

SPLITS = {"train": "train2014", "val": "val2014"}  # list name -> photo folder
ANNOTATION_FILE = "annotations/instances_{folder}.json"
DEFAULT_OUT = REPOSITORY / "data" / "coco14"
DESCRIPTOR_FILE = "dataset.json"
MASK_FOLDER = "SegmentationClass"  # the descriptor's default mask_dir
BACKGROUND = "background"
IGNORE_INDEX = MAX_LABEL_VALUE
DESCRIPTOR_LISTS = {"train": "train.txt", "train_aug": "train.txt", "val": "val.txt"}  # every train image has a mask
MIN_POLYGON_VALUES = 6  # three (x, y) points
MASK_CHUNKSIZE = 16
REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "segmentation"),
    "categories": ("id", "name"),
}
RLE_CODE_BITS, RLE_MORE_BIT, RLE_SIGN_BIT = 0x1F, 0x20, 0x10  # COCO's compressed RLE: 5 bits a character
RLE_CHARACTER_OFFSET, RLE_MAX_CODE = 48, 63


@dataclass(frozen=True)
class Annotation:
    """One annotation to paint: its id, class ``1..K``, crowd flag and checked segmentation (polygons or RLE)."""

    annotation_id: int
    class_index: int
    crowd: bool
    segmentation: list | dict


@dataclass(frozen=True)
class MaskJob:
    """One image's mask: where it goes, the image's size and its annotations."""

    path: Path
    height: int
    width: int
    annotations: tuple[Annotation, ...]


@dataclass(frozen=True)
class ImageRecord:
    """An entry of the ``images`` list."""

    image_id: int
    file_name: str
    height: int
    width: int

    @property
    def stem(self) -> str:
        return Path(self.file_name).stem


@dataclass(frozen=True)
class Split:
    """What one annotation file gives: its categories ``(id, name)`` in id order and, for every kept image
    in image-id order, its stem, index entry and mask job."""

    path: Path
    folder: str
    categories: tuple[tuple[int, str], ...]
    stems: list[str]
    entries: dict[str, IndexEntry]
    jobs: list[MaskJob]


@dataclass
class Warnings:
    """Warnings about one annotation file, counted per kind; ``report`` prints a line per kind."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, where)

    def report(self) -> None:
        for kind, count in self.counts.items():
            print(f"warning: {self.path}: {count} {kind} (first: {self.first[kind]})", file=sys.stderr)


# ----------------------------------------------------------------------------- reading the annotations
def read_annotation_file(path: Path) -> dict:
    """The JSON object of an instances file, with its ``images``, ``annotations`` and ``categories`` lists
    of objects that have the keys ``REQUIRED_KEYS`` names."""
    raw = read_json_object(path, "annotation file not found (COCO 2014's annotations/instances_*2014.json)",
                           "a COCO instances file is a JSON object")
    for key, required in REQUIRED_KEYS.items():
        if not isinstance(raw.get(key), list):
            raise DatasetError(f"{path}: no '{key}' list (an instances file has images, annotations, categories)")
        for number, record in enumerate(raw[key]):
            if not isinstance(record, dict) or any(name not in record for name in required):
                raise DatasetError(f"{path}: {key}[{number}] is not an object with the keys {', '.join(required)}")
    return raw


def _integer(value: object, where: str, minimum: int = 0) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``, else an error naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def parse_categories(raw: dict, path: Path) -> tuple[tuple[int, str], ...]:
    """``(id, name)`` in id order; ids and names unique, at most 254 categories (255 is the ignore index)."""
    categories = sorted(((_integer(record["id"], f"{path}: categories[{number}] 'id'"), record["name"])
                         for number, record in enumerate(raw["categories"])), key=lambda category: category[0])
    ids, names = [c[0] for c in categories], [c[1] for c in categories]
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names) or BACKGROUND in names:
        raise DatasetError(f"{path}: category names must be distinct strings other than '{BACKGROUND}'")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: category ids repeat")
    if not 1 <= len(categories) < IGNORE_INDEX:
        raise DatasetError(f"{path}: {len(categories)} categories; 1..{IGNORE_INDEX - 1} fit a PNG mask")
    return tuple(categories)


def parse_images(raw: dict, path: Path) -> dict[int, ImageRecord]:
    """The images by id; file names are plain names, sizes positive, ids unique."""
    images: dict[int, ImageRecord] = {}
    for number, record in enumerate(raw["images"]):
        where = f"{path}: images[{number}]"
        image_id = _integer(record["id"], f"{where} 'id'")
        file_name = record["file_name"]
        if not isinstance(file_name, str):
            raise DatasetError(f"{where}: 'file_name' must be a string, got {file_name!r}")
        check_image_id(file_name, where)
        if image_id in images:
            raise DatasetError(f"{where}: image id {image_id} repeats")
        images[image_id] = ImageRecord(image_id, file_name, _integer(record["height"], f"{where} 'height'", 1),
                                       _integer(record["width"], f"{where} 'width'", 1))
    return images


def parse_annotations(
    raw: dict, path: Path, images: dict[int, ImageRecord], classes: dict[int, int], warnings: Warnings
) -> dict[int, list[Annotation]]:
    """The usable annotations by image id; ``classes`` maps category ids to ``1..K``."""
    by_image: dict[int, list[Annotation]] = {}
    for number, record in enumerate(raw["annotations"]):
        where = f"{path}: annotations[{number}]"
        annotation_id = _integer(record["id"], f"{where} 'id'")
        image = images.get(_integer(record["image_id"], f"{where} 'image_id'"))
        if image is None:
            raise DatasetError(f"{where}: image id {record['image_id']} is not in 'images'")
        category_id = _integer(record["category_id"], f"{where} 'category_id'")
        if category_id not in classes:
            raise DatasetError(f"{where}: category id {category_id} is not in 'categories'")
        crowd = record.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        case = f"annotation {annotation_id} of image {image.image_id}"
        segmentation = _segmentation(record["segmentation"], image, f"{where} (id {annotation_id})", case, warnings)
        if segmentation is not None:
            annotation = Annotation(annotation_id, classes[category_id], bool(crowd), segmentation)
            by_image.setdefault(image.image_id, []).append(annotation)
    return by_image


def _segmentation(value: object, image: ImageRecord, where: str, case: str, warnings: Warnings) -> list | dict | None:
    """A checked segmentation: polygons (short ones dropped; None if none is left) or an RLE. ``where``
    locates it for errors, ``case`` names it in warnings."""
    if isinstance(value, list):
        polygons = [_polygon(polygon, image, f"{where} polygon {k}", case, warnings) for k, polygon in enumerate(value)]
        kept = [polygon for polygon in polygons if polygon is not None]
        if not kept:
            warnings.add("annotations without a polygon of 3 points or more skipped", case)
            return None
        return kept
    if isinstance(value, dict) and "counts" in value and "size" in value:
        _check_rle(value, image, where)
        return value
    raise DatasetError(f"{where}: 'segmentation' must be a list of polygons or an RLE {{'size', 'counts'}}")


def _polygon(polygon: object, image: ImageRecord, where: str, case: str, warnings: Warnings) -> list | None:
    """A polygon ``[x0, y0, x1, y1, ...]`` of finite numbers; None (with a warning) under 3 points."""
    try:
        values = np.asarray(polygon) if isinstance(polygon, list) else np.empty(0, dtype=object)
    except ValueError:  # ragged nesting
        values = np.empty(0, dtype=object)
    if values.ndim != 1 or values.dtype.kind not in "iuf" or len(values) % 2 or not np.all(np.isfinite(values)):
        raise DatasetError(f"{where}: a polygon is a flat list of x, y numbers, got {str(polygon)[:60]}")
    if len(values) < MIN_POLYGON_VALUES:
        warnings.add("polygons of fewer than 3 points skipped", case)
        return None
    xs, ys = values[0::2], values[1::2]
    if xs.min() < 0 or ys.min() < 0 or xs.max() > image.width or ys.max() > image.height:
        warnings.add("polygons reaching outside their image clipped", case)
    return polygon


def _check_rle(rle: dict, image: ImageRecord, where: str) -> None:
    """An RLE must be of its image's size and its runs must cover it exactly (pycocotools does not check)."""
    if rle["size"] != [image.height, image.width]:
        raise DatasetError(f"{where}: RLE size {rle['size']!r} is not the image's [{image.height}, {image.width}]")
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = rle_string_counts(counts, where)
    valid = isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    if not valid or sum(counts) != image.height * image.width:
        raise DatasetError(f"{where}: RLE runs must be non-negative integers adding up to "
                           f"{image.height} x {image.width} pixels")


def rle_string_counts(text: str, where: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``): 5 bits a character, a
    continuation and a sign bit, from the third run on relative to the run two before."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            code = ord(text[position]) - RLE_CHARACTER_OFFSET if position < len(text) else -1
            if not 0 <= code <= RLE_MAX_CODE:
                raise DatasetError(f"{where}: RLE 'counts' is not a compressed COCO RLE string")
            value |= (code & RLE_CODE_BITS) << shift
            more = bool(code & RLE_MORE_BIT)
            position, shift = position + 1, shift + 5
            if not more and code & RLE_SIGN_BIT:
                value |= -1 << shift
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts


def read_split(coco_dir: Path, folder: str) -> Split:
    """Read and check one instances file; images with no usable annotation or no photo are left out."""
    path = coco_dir / ANNOTATION_FILE.format(folder=folder)
    raw = read_annotation_file(path)
    categories = parse_categories(raw, path)
    classes = {category_id: index for index, (category_id, _) in enumerate(categories, start=1)}
    images = parse_images(raw, path)
    warnings = Warnings(path)
    by_image = parse_annotations(raw, path, images, classes, warnings)
    stems, entries, jobs = [], {}, []
    for image_id in sorted(by_image):
        image = images[image_id]
        if not (coco_dir / folder / image.file_name).is_file():
            warnings.add("images whose photo is missing left out", str(coco_dir / folder / image.file_name))
            continue
        annotations = tuple(by_image[image_id])
        stems.append(image.stem)
        entries[image.stem] = IndexEntry(f"{folder}/{image.file_name}",
                                         tuple(sorted({annotation.class_index for annotation in annotations})))
        jobs.append(MaskJob(coco_dir / MASK_FOLDER / f"{image.stem}{PNG_SUFFIX}", image.height, image.width,
                            annotations))
    warnings.report()
    if not stems:
        raise DatasetError(f"{path}: no image with annotations has its photo in {coco_dir / folder}")
    print(f"{folder}: {len(stems)} of {len(images)} images have annotations and a photo")
    return Split(path, folder, categories, stems, entries, jobs)


# ----------------------------------------------------------------------------- masks
def decode(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A checked segmentation (polygons, uncompressed or compressed RLE) as an ``(H, W)`` bool mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": [height, width], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def build_mask(job: MaskJob) -> np.ndarray:
    """``(H, W)`` uint8: crowd regions 255, then the objects painted from the largest to the smallest."""
    mask = np.zeros((job.height, job.width), np.uint8)
    decoded = [(annotation, decode(annotation.segmentation, job.height, job.width)) for annotation in job.annotations]
    for annotation, pixels in decoded:
        if annotation.crowd:
            mask[pixels] = IGNORE_INDEX
    objects = [(annotation, pixels) for annotation, pixels in decoded if not annotation.crowd]
    objects.sort(key=lambda item: (-int(item[1].sum()), item[0].annotation_id))
    for annotation, pixels in objects:
        mask[pixels] = annotation.class_index
    return mask


def write_mask(palette: np.ndarray, job: MaskJob) -> None:
    save_png(job.path, build_mask(job), palette)


def write_masks(split: Split, coco_dir: Path, workers: int, overwrite: bool) -> None:
    """The split's masks that do not exist yet (all with ``overwrite``), on ``workers`` processes."""
    what = f"{split.folder} masks"
    todo = set(pending_ids(coco_dir / MASK_FOLDER, split.stems, PNG_SUFFIX, overwrite, what))
    jobs = [job for stem, job in zip(split.stems, split.jobs) if stem in todo]
    writer = functools.partial(write_mask, voc_palette())
    for _ in parallel_map(writer, jobs, workers, what, chunksize=MASK_CHUNKSIZE):
        pass


# ----------------------------------------------------------------------------- the whole set
def prepare(coco_dir: Path, out_dir: Path, workers: int, overwrite: bool = False) -> Path:
    """Check both annotation files, write the masks, then the lists, the index and the descriptor;
    returns the descriptor's path."""
    if not coco_dir.is_dir():
        raise DatasetError(f"{coco_dir}: COCO folder not found (it holds annotations/, train2014/, val2014/)")
    splits = {name: read_split(coco_dir, folder) for name, folder in SPLITS.items()}
    train, val = splits["train"], splits["val"]
    if val.categories != train.categories:
        raise DatasetError(f"{val.path}: its categories differ from those of {train.path}")
    shared = set(train.entries) & set(val.entries)
    if shared:
        raise DatasetError(f"{val.path}: photo '{sorted(shared)[0]}' has the stem of one in {train.path}")
    for split in splits.values():
        write_masks(split, coco_dir, workers, overwrite)
    for name, split in splits.items():
        atomic_write_text(out_dir / DESCRIPTOR_LISTS[name], "\n".join(split.stems) + "\n")
    write_image_index(out_dir / INDEX_FILE, {**train.entries, **val.entries})
    descriptor = out_dir / DESCRIPTOR_FILE
    write_coco_descriptor(descriptor, out_dir.name, [BACKGROUND, *(name for _, name in train.categories)],
                          coco_dir.resolve(), DESCRIPTOR_LISTS, IGNORE_INDEX)
    return descriptor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--coco_dir", type=Path, required=True,
                        help="COCO 2014 root with annotations/, train2014/, val2014/ (masks go to its "
                             f"{MASK_FOLDER}/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder of the lists, the label index and dataset.json (default: data/coco14)")
    parser.add_argument("--workers", type=positive_int, default=default_jobs(),
                        help="processes writing masks (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite masks that exist")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    descriptor = prepare(args.coco_dir, args.out, args.workers, args.overwrite)
    print(f"Next: python train_caae.py --dataset {descriptor}")


if __name__ == "__main__":
    run_main(main)

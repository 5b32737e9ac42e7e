"""The COCO layout: MS COCO 2014 as ``tools.prepare_coco`` prepares it (no torch, no pycocotools).

A COCO-layout descriptor (``"layout": "coco"``) names an index file, one entry per image::

    {"COCO_train2014_000000000009": {"file": "train2014/COCO_train2014_000000000009.jpg", "labels": [45, 50]}}

``file`` is the photo relative to the dataset root (COCO's own folders, no ``JPEGImages/``), ``labels``
the image-level class ids ``1..K`` (crowd regions included, see ``tools.prepare_coco``). Masks are
palette PNGs ``<root>/<mask_dir>/<id>.png`` (``SegmentationClass``) as for VOC.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from tools.artifacts.files import atomic_write_text
from tools.data.descriptor import COCO_LAYOUT, DatasetDescriptor, DatasetError, check_image_id, read_json_object
from tools.data.voc import VOCReader

INDEX_FILE = "image_labels.json"


@dataclass(frozen=True)
class IndexEntry:
    """One image of the index: its photo relative to the dataset root and its class ids ``1..K``."""

    file: str
    labels: tuple[int, ...]


class COCOReader(VOCReader):
    """Reads a COCO-layout dataset root: photos and labels through the index, masks as VOC's.

    COCO has no SBD-style second mask set, so ``aug`` masks are the ``SegmentationClass`` ones.
    """


    def __init__(self, descriptor: DatasetDescriptor, data_dir: str | Path | None = None) -> None:
        super().__init__(descriptor, data_dir)
        if descriptor.index_file is None:
            raise DatasetError(f"{descriptor.path}: layout '{COCO_LAYOUT}' needs 'index_file'")
        self.index = read_image_index(descriptor.index_file, descriptor.num_foreground)

    def entry(self, image_id: str) -> IndexEntry:
        """The index entry of an id; an id the index lacks is an error naming the index file."""
        try:
            return self.index[image_id]
        except KeyError:
            raise DatasetError(f"{self.descriptor.index_file}: id '{image_id}' is not in the index "
                               "(was the list made by another tools.prepare_coco run?)") from None

    def image_path(self, image_id: str) -> Path:
        return self.root / self.entry(image_id).file

    def mask_path(self, image_id: str, aug: bool = False) -> Path:
        return self.root / self.descriptor.mask_dir / f"{image_id}.png"

    def load_label(self, image_id: str) -> np.ndarray:
        """Multi-hot float32 ``(num_foreground,)`` from the index."""
        label = np.zeros(self.descriptor.num_foreground, dtype=np.float32)
        label[np.asarray(self.entry(image_id).labels, dtype=np.int64) - 1] = 1.0
        return label

    def read_object_names(self, image_id: str) -> list[str]:
        """Class names of the image's labels, one per class (the index keeps no instance count)."""
        return [self.descriptor.class_names[class_id] for class_id in self.entry(image_id).labels]

    def validate(self, ids: list[str], labels: bool = True) -> None:
        """Fail before any work, naming the first id that the index lacks or whose photo is missing (the
        labels are in the index: ``labels`` needs no file)."""
        for image_id in ids:
            path = self.image_path(image_id)
            if not path.is_file():
                raise DatasetError(f"{path}: image of id '{image_id}' is missing")


def read_image_index(path: Path, num_foreground: int) -> dict[str, IndexEntry]:
    """Read and check an index file; every problem is a one-line error naming the file and the id."""
    raw = read_json_object(path, "index file not found (write it with python -m tools.prepare_coco)",
                           'an index is a JSON object {id: {"file": ..., "labels": [...]}}')
    return {image_id: _index_entry(image_id, value, path, num_foreground) for image_id, value in raw.items()}


def _index_entry(image_id: str, value: object, path: Path, num_foreground: int) -> IndexEntry:
    check_image_id(image_id, str(path))
    where = f"{path}: id '{image_id}'"
    if not isinstance(value, dict) or not isinstance(value.get("file"), str) or "labels" not in value:
        raise DatasetError(f"{where}: an entry is {{\"file\": \"<folder>/<photo>\", \"labels\": [...]}}")
    file = PurePosixPath(value["file"])
    if file.is_absolute() or ".." in file.parts or "\\" in value["file"] or not file.name:
        raise DatasetError(f"{where}: 'file' must be a path inside the dataset root, got {value['file']!r}")
    labels = value["labels"]
    valid = isinstance(labels, list) and all(
        isinstance(label, int) and not isinstance(label, bool) and 1 <= label <= num_foreground for label in labels)
    if not valid or len(set(labels)) != len(labels):
        raise DatasetError(f"{where}: 'labels' must list distinct class ids in 1..{num_foreground}, got {labels!r}")
    return IndexEntry(value["file"], tuple(labels))


def write_image_index(path: Path, index: dict[str, IndexEntry]) -> None:
    """Write an index atomically, one entry a line, in the given order."""
    lines = [f"{json.dumps(image_id)}: {json.dumps({'file': entry.file, 'labels': list(entry.labels)})}"
             for image_id, entry in index.items()]
    atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")


def write_coco_descriptor(
    path: Path, name: str, class_names: list[str], data_dir: Path, lists: dict[str, str], ignore_index: int
) -> None:
    """Write a COCO-layout descriptor atomically; its index file is ``INDEX_FILE`` beside it."""
    content = {
        "name": name,
        "layout": COCO_LAYOUT,
        "class_names": class_names,
        "ignore_index": ignore_index,
        "palette": "voc",
        "data_dir": str(data_dir),
        "index_file": INDEX_FILE,
        "lists": lists,
    }
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")

"""Reading a dataset's photos, image-level labels and masks (no torch: ``evaluate.py`` uses it too).

``VOCReader`` works for PASCAL VOC 2012 (+ SBD's ``SegmentationClassAug``) and for the synthetic
dataset of ``tools.synthetic``: both use ``<root>/JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``
and palette PNG masks with 255 = ignore. Class names come from the dataset descriptor;
``tools.data.readers.make_reader`` picks the reader of the descriptor's layout.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from PIL import Image

from tools.artifacts.files import load_label_png
from tools.data.descriptor import DatasetDescriptor, DatasetError


class VOCReader:
    """Reads images, image-level labels and masks of one VOC-layout dataset root."""

    def __init__(self, descriptor: DatasetDescriptor, data_dir: str | Path | None = None) -> None:
        self.descriptor = descriptor
        self.root = descriptor.resolve_data_dir(data_dir)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root not found (check --data_dir)")
        self.class_index = {name: index for index, name in enumerate(descriptor.foreground_names)}

    # -- paths
    def image_path(self, image_id: str) -> Path:
        return self.root / self.descriptor.image_dir / f"{image_id}.jpg"

    def annotation_path(self, image_id: str) -> Path:
        return self.root / self.descriptor.annotation_dir / f"{image_id}.xml"

    def mask_path(self, image_id: str, aug: bool = False) -> Path:
        folder = self.descriptor.aug_mask_dir if aug else self.descriptor.mask_dir
        return self.root / folder / f"{image_id}.png"

    # -- readers
    def load_image(self, image_id: str) -> Image.Image:
        """The RGB photo of an id."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise DatasetError(f"{path}: image of id '{image_id}' is missing")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:
            raise DatasetError(f"{path}: unreadable image ({error})") from error

    def load_label(self, image_id: str) -> np.ndarray:
        """Multi-hot float32 ``(num_foreground,)`` from the XML objects (difficult ones included)."""
        label = np.zeros(self.descriptor.num_foreground, dtype=np.float32)
        for name in self.read_object_names(image_id):
            label[self.class_index[name]] = 1.0
        return label

    def read_object_names(self, image_id: str) -> list[str]:
        """Class names of the XML's top-level objects whose clamped box is not empty."""
        path = self.annotation_path(image_id)
        if not path.is_file():
            raise DatasetError(f"{path}: annotation of id '{image_id}' is missing")
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as error:
            raise DatasetError(f"{path}: unreadable XML ({error})") from error
        width, height = _xml_size(root, path)
        names = []
        for element in root.findall("object"):
            name = (element.findtext("name") or "").strip()
            if name not in self.class_index:
                raise DatasetError(
                    f"{path}: unknown class name '{name}' (descriptor {self.descriptor.path} "
                    f"knows {list(self.class_index)})"
                )
            box = element.find("bndbox")
            if box is not None and width and height:
                xmin, xmax = (_clamp(_coordinate(box, key, path), width - 1) for key in ("xmin", "xmax"))
                ymin, ymax = (_clamp(_coordinate(box, key, path), height - 1) for key in ("ymin", "ymax"))
                if xmax - xmin == 0 or ymax - ymin == 0:
                    continue
            names.append(name)
        return names

    def load_mask(self, image_id: str, aug: bool = False, required: bool = False) -> np.ndarray | None:
        """``(H, W)`` uint8 class indices (255 = ignore), or None if the PNG is absent and not required."""
        path = self.mask_path(image_id, aug)
        if not path.is_file():
            if required:
                raise DatasetError(f"{path}: mask of id '{image_id}' is missing")
            return None
        mask = read_mask_png(path)
        image_size = self.image_size(image_id)
        if mask.shape != image_size:
            raise DatasetError(
                f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                f"{image_size[1]}x{image_size[0]}"
            )
        return mask

    def image_size(self, image_id: str) -> tuple[int, int]:
        """``(H, W)`` without decoding the pixels."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise DatasetError(f"{path}: image of id '{image_id}' is missing")
        try:
            with Image.open(path) as image:
                return image.height, image.width
        except Exception as error:
            raise DatasetError(f"{path}: unreadable image ({error})") from error

    def validate(self, ids: list[str], labels: bool = True) -> None:
        """Fail before any work, naming the first id whose photo (or, with ``labels``, XML annotation) is
        missing: one ``stat`` per file, no decoding."""
        for image_id in ids:
            paths = [("image", self.image_path(image_id))]
            if labels:
                paths.append(("annotation", self.annotation_path(image_id)))
            for kind, path in paths:
                if not path.is_file():
                    raise DatasetError(f"{path}: {kind} of id '{image_id}' is missing")


def read_mask_png(path: str | Path) -> np.ndarray:
    """Palette (or grayscale) PNG mask -> ``(H, W)`` uint8 indices."""
    return load_label_png(path, DatasetError, "mask PNG")


def _xml_size(root: ElementTree.Element, path: Path) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        return 0, 0
    try:
        return int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0")))
    except ValueError as error:
        raise DatasetError(f"{path}: bad <size> ({error})") from error


def _coordinate(box: ElementTree.Element, key: str, path: Path) -> int:
    text = (box.findtext(key) or "").strip()
    try:
        return int(text.split(".")[0])
    except ValueError as error:
        raise DatasetError(f"{path}: bad box coordinate <{key}>{text}</{key}>") from error


def _clamp(value: int, upper: int) -> int:
    return min(max(value, 0), upper)

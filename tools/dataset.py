"""VOC-layout reader and the datasets each stage trains or infers on.

The reader works for PASCAL VOC 2012 (+ SBD's ``SegmentationClassAug``) and for the synthetic
dataset of ``tools.synthetic``: both use ``<root>/JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``
and palette PNG masks with 255 = ignore. Class names come from the dataset descriptor.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tools.artifacts import load_label_png
from tools.descriptor import DatasetDescriptor, DatasetError


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

    def validate(self, ids: list[str]) -> None:
        """Fail early, naming the first id whose image or annotation is missing."""
        for image_id in ids:
            for kind, path in (("image", self.image_path(image_id)), ("annotation", self.annotation_path(image_id))):
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


# ----------------------------------------------------------------------------- stage datasets
class ClassificationDataset(Dataset):
    """CAAE / SemFormer training: ``(image (3, S, S), label (C,))``.

    When the transform also returns a crop box (SemFormer's random crop), the item is
    ``(image, label, crop_box (4,) = xmin, ymin, xmax, ymax)``.
    """

    def __init__(self, reader: VOCReader, ids: list[str], transform: Callable) -> None:
        self.reader, self.ids, self.transform = reader, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image_id = self.ids[index]
        output = self.transform(self.reader.load_image(image_id))
        label = torch.from_numpy(self.reader.load_label(image_id))
        if isinstance(output, tuple):
            image, *extras = output
            return (image, label, *extras)
        return output, label


class CAMTestDataset(Dataset):
    """Checkpoint selection during training: ``(image, label (C,), mask (H, W) int64)``."""

    def __init__(self, reader: VOCReader, ids: list[str], transform: Callable) -> None:
        self.reader, self.ids, self.transform = reader, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        image = self.reader.load_image(image_id)
        mask = self.reader.load_mask(image_id, required=True)
        image, mask = self.transform(image, mask)
        return image, torch.from_numpy(self.reader.load_label(image_id)), mask


class CAMMakingDataset(Dataset):
    """CAM inference: ``(PIL image, id, label (C,) float32)``, untransformed."""

    def __init__(self, reader: VOCReader, ids: list[str]) -> None:
        self.reader, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, str, np.ndarray]:
        image_id = self.ids[index]
        return self.reader.load_image(image_id), image_id, self.reader.load_label(image_id)


class AffinityDataset(Dataset):
    """AffinityNet training: ``(image (3, S, S), affinity label (S/4, S/4) int64)``.

    Affinity labels are the grayscale PNGs of ``make_affinity_labels.py`` (255 = uncertain).
    """

    def __init__(self, reader: VOCReader, ids: list[str], label_dir: str | Path, transform: Callable) -> None:
        self.reader, self.ids, self.label_dir, self.transform = reader, ids, Path(label_dir), transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        image = self.reader.load_image(image_id)
        path = self.label_dir / f"{image_id}.png"
        if not path.is_file():
            raise DatasetError(f"{path}: affinity label of id '{image_id}' is missing")
        label = read_mask_png(path)
        if label.shape != (image.height, image.width):
            raise DatasetError(f"{path}: affinity label size {label.shape[::-1]} differs from the image's")
        return self.transform(image, label)


class SegmentationDataset(Dataset):
    """DeepLab training: ``(image (3, S, S), label (S, S) int64)`` from a folder of ``<id>.png`` labels.

    Labels are palette or grayscale PNGs of class indices with ``ignore_index`` (255) = no loss:
    pseudo labels of ``make_pseudo_labels.py`` or ground truth such as ``SegmentationClassAug``.
    ``check_files`` fails early on a missing label or one whose size differs from its image; the
    values are checked as each label is read (a label value must be a class of the descriptor).
    """

    def __init__(self, reader: VOCReader, ids: list[str], label_dir: str | Path, transform: Callable) -> None:
        self.reader, self.ids, self.label_dir, self.transform = reader, ids, Path(label_dir), transform
        self.num_classes = reader.descriptor.num_classes
        self.ignore_index = reader.descriptor.ignore_index

    def __len__(self) -> int:
        return len(self.ids)

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    def check_files(self) -> None:
        """Every id has a label PNG of its image's size (header reads only, no decoding)."""
        absent = [image_id for image_id in self.ids if not self.label_path(image_id).is_file()]
        if absent:
            raise DatasetError(f"{self.label_path(absent[0])}: label of id '{absent[0]}' is missing "
                               f"({len(absent)} of {len(self.ids)} labels missing in {self.label_dir})")
        for image_id in self.ids:
            path = self.label_path(image_id)
            try:
                with Image.open(path) as label:
                    label_size = label.height, label.width
            except Exception as error:
                raise DatasetError(f"{path}: unreadable label PNG ({error})") from error
            self._check_size(path, label_size, self.reader.image_size(image_id))

    def load_label(self, image_id: str) -> np.ndarray:
        """``(H, W)`` uint8 label of an id, checked against its image size and the descriptor's classes."""
        path = self.label_path(image_id)
        if not path.is_file():
            raise DatasetError(f"{path}: label of id '{image_id}' is missing")
        label = read_mask_png(path)
        self._check_size(path, label.shape, self.reader.image_size(image_id))
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            raise DatasetError(f"{path}: label value {int(bad[0])} is not a class of the descriptor "
                               f"(0..{self.num_classes - 1}, ignore {self.ignore_index})")
        return label

    @staticmethod
    def _check_size(path: Path, label_size: tuple[int, int], image_size: tuple[int, int]) -> None:
        if tuple(label_size) != tuple(image_size):
            raise DatasetError(f"{path}: label size {label_size[1]}x{label_size[0]} differs from the image's "
                               f"{image_size[1]}x{image_size[0]}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        return self.transform(self.reader.load_image(image_id), self.load_label(image_id))

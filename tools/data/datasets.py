"""The datasets each stage trains or infers on, over a reader of ``tools.data.voc``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tools.data.descriptor import DatasetError
from tools.data.transforms import cam_inputs
from tools.data.voc import VOCReader, read_mask_png


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
    """CAM inference inputs, decoded and resized by DataLoader workers ahead of the model:
    ``(id, keys (n+1,) int64 with background 0 first, (H, W), [(3, h_s, w_s) per scale])``."""

    def __init__(self, reader: VOCReader, ids: list[str], scales: Sequence[float], patch_size: int) -> None:
        self.reader, self.ids, self.scales, self.patch_size = reader, ids, scales, patch_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray, tuple[int, int], list[torch.Tensor]]:
        image_id = self.ids[index]
        image = self.reader.load_image(image_id)
        keys = np.concatenate([[0], np.flatnonzero(self.reader.load_label(image_id)) + 1]).astype(np.int64)
        return image_id, keys, (image.height, image.width), cam_inputs(image, self.scales, self.patch_size)


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

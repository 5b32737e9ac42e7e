"""Dataset descriptor: class names, palette and list files of a VOC-layout dataset.

A descriptor is a small JSON file (``data/voc12/dataset.json``, or the one the synthetic
generator writes next to its images). Every stage reads class counts, names, the palette and
the list files from it, so nothing in the code base hard-codes VOC's 21 classes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_DESCRIPTOR = Path(__file__).resolve().parent.parent / "data" / "voc12" / "dataset.json"


class DatasetError(ValueError):
    """Bad dataset input: the message names the file and the problem."""


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The standard PASCAL VOC bit-interleaved colour map, ``(num_entries, 3)`` uint8."""
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for index in range(num_entries):
        r = g = b = 0
        code = index
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[index] = (r, g, b)
    return palette


@dataclass(frozen=True)
class DatasetDescriptor:
    """What a VOC-layout dataset looks like. ``class_names[0]`` is the background."""

    path: Path
    name: str
    class_names: tuple[str, ...]
    ignore_index: int = 255
    data_dir: Path | None = None
    image_dir: str = "JPEGImages"
    annotation_dir: str = "Annotations"
    mask_dir: str = "SegmentationClass"
    aug_mask_dir: str = "SegmentationClassAug"
    lists: dict[str, Path] = field(default_factory=dict)
    palette_spec: str | tuple[tuple[int, int, int], ...] = "voc"

    @property
    def num_classes(self) -> int:
        """Classes including background (21 for VOC)."""
        return len(self.class_names)

    @property
    def num_foreground(self) -> int:
        """Image-level classes (20 for VOC)."""
        return len(self.class_names) - 1

    @property
    def foreground_names(self) -> tuple[str, ...]:
        return self.class_names[1:]

    @property
    def palette(self) -> np.ndarray:
        """``(256, 3)`` uint8 colour map for palette PNGs: the descriptor's colours first, VOC's after."""
        palette = voc_palette(256)
        if self.palette_spec != "voc":
            colours = np.asarray(self.palette_spec, dtype=np.uint8).reshape(-1, 3)
            palette[: len(colours)] = colours
        return palette

    def list_path(self, domain: str) -> Path:
        if domain not in self.lists:
            raise DatasetError(
                f"{self.path}: no list file for domain '{domain}'; known domains: {sorted(self.lists)}"
            )
        return self.lists[domain]

    def read_ids(self, domain: str) -> list[str]:
        """Image ids of a domain (``train``, ``train_aug``, ``val``, ...)."""
        return read_id_list(self.list_path(domain))

    def resolve_data_dir(self, override: str | Path | None = None) -> Path:
        """The dataset root: ``override`` if given, else the descriptor's ``data_dir``."""
        if override:
            return Path(override)
        if self.data_dir is None:
            raise DatasetError(f"{self.path}: no 'data_dir' in the descriptor; pass --data_dir")
        return self.data_dir


def read_id_list(path: str | Path) -> list[str]:
    """One id per line; blank lines skipped. An empty or missing list is an error."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: list file not found")
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: list file is empty")
    return ids


def load_descriptor(path: str | Path = DEFAULT_DESCRIPTOR) -> DatasetDescriptor:
    """Read a descriptor JSON; relative paths in it are relative to the JSON file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset descriptor not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    names = raw.get("class_names")
    if not isinstance(names, list) or len(names) < 2:
        raise DatasetError(f"{path}: 'class_names' must list the background and at least one class")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: 'class_names' has duplicates")
    base = path.parent
    lists = {domain: base / name for domain, name in raw.get("lists", {}).items()}
    data_dir = raw.get("data_dir")
    palette = raw.get("palette", "voc")
    if palette != "voc":
        if not isinstance(palette, list) or any(len(colour) != 3 for colour in palette):
            raise DatasetError(f"{path}: 'palette' must be \"voc\" or a list of [r, g, b] triples")
        palette = tuple(tuple(int(v) for v in colour) for colour in palette)
    return DatasetDescriptor(
        path=path,
        name=raw.get("name", path.parent.name),
        class_names=tuple(names),
        ignore_index=int(raw.get("ignore_index", 255)),
        data_dir=(base / data_dir).resolve() if data_dir is not None else None,
        image_dir=raw.get("image_dir", "JPEGImages"),
        annotation_dir=raw.get("annotation_dir", "Annotations"),
        mask_dir=raw.get("mask_dir", "SegmentationClass"),
        aug_mask_dir=raw.get("aug_mask_dir", "SegmentationClassAug"),
        lists=lists,
        palette_spec=palette,
    )


def write_descriptor(
    path: str | Path,
    name: str,
    class_names: list[str],
    lists: dict[str, str],
    data_dir: str = ".",
    ignore_index: int = 255,
) -> None:
    """Write a descriptor JSON (used by the synthetic generator)."""
    from tools.artifacts import atomic_write_text

    content = {
        "name": name,
        "class_names": list(class_names),
        "ignore_index": ignore_index,
        "palette": "voc",
        "data_dir": data_dir,
        "lists": lists,
    }
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")

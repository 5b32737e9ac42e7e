"""Dataset descriptor: class names, palette, layout and list files of a dataset.

A descriptor is a small JSON file (``data/voc12/dataset.json``, the one the synthetic generator
writes next to its images, or the one ``tools.prepare_coco`` writes for MS COCO). Every stage reads
class counts, names, the palette and the list files from it, so nothing in the code base hard-codes
VOC's 21 classes. ``layout`` is ``"voc"`` (default: ``JPEGImages/``, ``Annotations/`` XML) or
``"coco"`` (photo files and image-level labels from the JSON ``index_file``, see ``tools.data.coco``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.conventions import IGNORE_INDEX
from tools.artifacts.files import atomic_write_text
from tools.cli.repository import REPOSITORY

DEFAULT_DESCRIPTOR = REPOSITORY / "data" / "voc12" / "dataset.json"
MAX_LABEL_VALUE = 255  # label maps are uint8 PNGs
FOLDER_KEYS = ("image_dir", "annotation_dir", "mask_dir", "aug_mask_dir")
VOC_LAYOUT = "voc"
COCO_LAYOUT = "coco"  # photos and labels from an index file (tools.data.coco), masks in mask_dir
LAYOUTS = (VOC_LAYOUT, COCO_LAYOUT)
LIST_ENCODING = "utf-8-sig"  # UTF-8, without the byte-order mark Windows editors put first


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
    ignore_index: int = IGNORE_INDEX
    data_dir: Path | None = None
    image_dir: str = "JPEGImages"
    annotation_dir: str = "Annotations"
    mask_dir: str = "SegmentationClass"
    aug_mask_dir: str = "SegmentationClassAug"
    lists: dict[str, Path] = field(default_factory=dict)
    palette_spec: str | tuple[tuple[int, int, int], ...] = "voc"
    layout: str = VOC_LAYOUT
    index_file: Path | None = None  # the COCO layout's {id: {"file", "labels"}} JSON

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
    """One id per line (the first word; blank lines skipped; a UTF-8 byte-order mark, which some editors
    write, is dropped). An empty or missing list, an id that is not a plain file name (every stage writes
    ``<folder>/<id>.<suffix>``), or an id listed twice (a stage would use it twice) is an error."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: list file not found")
    try:
        lines = path.read_text(encoding=LIST_ENCODING).splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a text list of ids ({error})") from error
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: list file is empty")
    first_seen: dict[str, int] = {}
    for number, image_id in enumerate(ids, start=1):
        check_image_id(image_id, f"{path}, id {number}")
        if image_id in first_seen:
            raise DatasetError(f"{path}: id '{image_id}' is listed twice (ids {first_seen[image_id]} and {number}); "
                               "remove the repeat, each id is used once")
        first_seen[image_id] = number
    return ids


def check_image_id(image_id: str, where: str) -> None:
    """An id must be a plain file name: no path separator, not ``.``/``..``, no hidden-file dot first."""
    if not image_id or "/" in image_id or "\\" in image_id or "\0" in image_id or image_id.startswith("."):
        raise DatasetError(f"{where}: id {image_id!r} is not a plain file name (no '/', '\\', or leading '.')")


def read_json_object(path: str | Path, missing: str, shape: str) -> dict:
    """The JSON object of a dataset file; a missing file (``missing`` says what it is), bad JSON or
    another JSON value (``shape`` says what it should be) is a ``DatasetError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {missing}")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: {shape}; found a JSON {type(raw).__name__}")
    return raw


def load_descriptor(path: str | Path = DEFAULT_DESCRIPTOR) -> DatasetDescriptor:
    """Read and check a descriptor JSON; relative paths in it are relative to the JSON file."""
    path = Path(path)
    raw = read_json_object(path, "dataset descriptor not found",
                           "a descriptor is a JSON object with class_names, lists, ...")
    names = raw.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(name, str) for name in names):
        raise DatasetError(f"{path}: 'class_names' must list the background and at least one class, as strings")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: 'class_names' has duplicates")
    base = path.parent
    lists = raw.get("lists", {})
    if not isinstance(lists, dict) or not all(isinstance(name, str) for name in lists.values()):
        raise DatasetError(f"{path}: 'lists' must map domains to list files, e.g. {{\"train\": \"train.txt\"}}")
    ignore_index = raw.get("ignore_index", IGNORE_INDEX)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) \
            or not len(names) <= ignore_index <= MAX_LABEL_VALUE:
        raise DatasetError(f"{path}: 'ignore_index' must be an integer in {len(names)}..{MAX_LABEL_VALUE} "
                           f"(above the class ids, within a PNG label), got {ignore_index!r}")
    for key in ("name", "data_dir", "index_file", *FOLDER_KEYS):
        if key in raw and not isinstance(raw[key], str):
            raise DatasetError(f"{path}: '{key}' must be a string, got {raw[key]!r}")
    layout = raw.get("layout", VOC_LAYOUT)
    if layout not in LAYOUTS:
        raise DatasetError(f"{path}: 'layout' must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == COCO_LAYOUT and "index_file" not in raw:
        raise DatasetError(f"{path}: layout 'coco' needs 'index_file', the JSON of photo files and labels "
                           "(written by python -m tools.prepare_coco)")
    data_dir = raw.get("data_dir")
    index_file = raw.get("index_file")
    return DatasetDescriptor(
        path=path,
        name=raw.get("name", path.parent.name),
        class_names=tuple(names),
        ignore_index=ignore_index,
        data_dir=(base / data_dir).resolve() if data_dir is not None else None,
        lists={domain: base / name for domain, name in lists.items()},
        palette_spec=_palette_spec(raw.get("palette", "voc"), path),
        layout=layout,
        index_file=base / index_file if index_file is not None else None,
        **{key: raw[key] for key in FOLDER_KEYS if key in raw},
    )


def _palette_spec(palette: object, path: Path) -> str | tuple[tuple[int, int, int], ...]:
    """``"voc"`` or a list of ``[r, g, b]`` triples of integers in 0..255."""
    if palette == "voc":
        return "voc"
    valid = isinstance(palette, list) and len(palette) <= MAX_LABEL_VALUE + 1 and all(
        isinstance(colour, list) and len(colour) == 3
        and all(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LABEL_VALUE
                for value in colour)
        for colour in palette)
    if not valid:
        raise DatasetError(f"{path}: 'palette' must be \"voc\" or at most 256 [r, g, b] triples of integers "
                           "in 0..255")
    return tuple(tuple(colour) for colour in palette)


def write_descriptor(
    path: str | Path,
    name: str,
    class_names: list[str],
    lists: dict[str, str],
    data_dir: str = ".",
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Write a descriptor JSON (used by the synthetic generator)."""
    content = {
        "name": name,
        "class_names": list(class_names),
        "ignore_index": ignore_index,
        "palette": "voc",
        "data_dir": data_dir,
        "lists": lists,
    }
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")

"""PASCAL VOC 2012 and SBD as downloaded: their files read from the archive or its unpacked folder, and
their masks checked and written as palette PNGs (no torch: ``tools.prepare_voc``'s mask workers import
only this module).

An input is read in one pass, member by member (``Source.members``): an archive is streamed
(tarfile's ``r|*``, so the gzip of SBD's ``benchmark.tgz`` is decompressed once, front to back, and
nothing is unpacked to disk), a folder is listed. Each member is named relative to the dataset root
inside it, ``VOCdevkit/VOC2012/`` or ``benchmark_RELEASE/dataset/``; messages name a member as
``<archive>:<path in the archive>`` or by its path on disk.
"""
from __future__ import annotations

import fnmatch
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Generator

import numpy as np
from PIL import Image
from scipy.io import loadmat
from tqdm import tqdm

from tools.artifacts.files import atomic_write_bytes, save_png
from tools.data.descriptor import MAX_LABEL_VALUE, DatasetError, check_image_id, voc_palette

IGNORE_VALUE = MAX_LABEL_VALUE  # VOC's 255 band on object borders
SBD_STRUCT, SBD_FIELD = "GTcls", "Segmentation"  # cls/<id>.mat: struct GTcls, class ids in GTcls.Segmentation
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)  # gzip.BadGzipFile is an OSError
SHOWN_VALUES = 5  # bad mask values named in a message


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files lie in its archive: the dataset root's path, a folder only that root has
    (to find the root in an unpacked folder) and the members to read, ``{folder: file name pattern}``
    relative to the root (``""`` is the root itself)."""

    root: tuple[str, ...]
    marker: str
    members: dict[str, str]


@dataclass(frozen=True)
class Member:
    """One file of an input: its folder relative to the dataset root, its file name, how messages name
    it, and ``read()`` for its bytes (for an archive, only until the next member is taken)."""

    folder: str
    file_name: str
    where: str
    read: Callable[[], bytes]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.file_name).stem


class _ProgressReader:
    """A binary file whose reads advance a byte-counting progress bar."""

    def __init__(self, handle: BinaryIO, progress: tqdm) -> None:
        self.handle, self.progress = handle, progress

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.progress.update(len(data))
        return data


class Source:
    """A dataset input: a tar archive (any compression) or the folder it unpacks to."""

    def __init__(self, path: Path, layout: Layout) -> None:
        if not path.exists():
            raise DatasetError(f"{path}: not found")
        self.path, self.layout = path, layout
        self.root_name = "/".join(layout.root)
        self.folder_root = self._find_root() if path.is_dir() else None

    def _find_root(self) -> Path:
        """The dataset root inside the folder: the folder itself or one of the root's tails below it."""
        parts = self.layout.root
        for start in range(len(parts) + 1):
            candidate = self.path.joinpath(*parts[start:])
            if (candidate / self.layout.marker).is_dir():
                return candidate
        raise DatasetError(f"{self.path}: no {self.root_name}/{self.layout.marker}/ folder inside (pass the "
                           "archive or the folder it unpacks to)")

    def where(self, relative: str) -> str:
        """How messages name the member at ``relative`` (to the dataset root), whether or not it exists."""
        if self.folder_root is not None:
            return str(self.folder_root / relative)
        return f"{self.path}:{self.root_name}/{relative}"

    def members(self) -> Generator[Member, None, None]:
        """The layout's members, with a progress bar: in archive order, or folder by folder, sorted."""
        if self.folder_root is not None:
            return self._folder_members(self.folder_root)
        return self._archive_members()

    def _folder_members(self, root: Path) -> Generator[Member, None, None]:
        files = [(folder, path) for folder, pattern in self.layout.members.items()
                 for path in sorted((root / folder).glob(pattern)) if path.is_file() and _wanted(path.name, pattern)]
        for folder, path in tqdm(files, desc=f"reading {self.path.name}", unit="files", dynamic_ncols=True):
            yield Member(folder, path.name, str(path), path.read_bytes)

    def _archive_members(self) -> Generator[Member, None, None]:
        under_root = 0
        with self.path.open("rb") as handle, tqdm(total=self.path.stat().st_size, desc=f"reading {self.path.name}",
                                                  unit="B", unit_scale=True, dynamic_ncols=True) as progress:
            try:
                with tarfile.open(fileobj=_ProgressReader(handle, progress), mode="r|*") as archive:
                    for entry in archive:
                        parts = PurePosixPath(entry.name.removeprefix("./")).parts
                        if parts[:len(self.layout.root)] != self.layout.root:
                            continue
                        under_root += 1
                        folder, file_name = "/".join(parts[len(self.layout.root):-1]), parts[-1]
                        pattern = self.layout.members.get(folder)
                        if entry.isfile() and pattern is not None and _wanted(file_name, pattern):
                            yield Member(folder, file_name, f"{self.path}:{entry.name}",
                                         lambda entry=entry: self._read_entry(archive, entry))
            except ARCHIVE_ERRORS as error:
                raise DatasetError(f"{self.path}: damaged or not a tar archive ({error})") from error
        if not under_root:
            raise DatasetError(f"{self.path}: no member under {self.root_name}/ (not the archive it should be)")

    def _read_entry(self, archive: tarfile.TarFile, entry: tarfile.TarInfo) -> bytes:
        try:
            handle = archive.extractfile(entry)
            return handle.read() if handle is not None else b""
        except ARCHIVE_ERRORS as error:
            raise DatasetError(f"{self.path}:{entry.name}: damaged member ({error})") from error


def _wanted(file_name: str, pattern: str) -> bool:
    """A member to read: its name matches the pattern and is not hidden (a macOS tar's ``._<name>``)."""
    return fnmatch.fnmatchcase(file_name, pattern) and not file_name.startswith(".")


def parse_ids(data: bytes, where: str) -> list[str]:
    """The ids of a list file's bytes, the first word of each line (blank lines skipped), as
    ``tools.descriptor.read_id_list`` reads list files; an empty list or an id that is not a plain file
    name is an error."""
    try:
        ids = [line.split()[0] for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise DatasetError(f"{where}: not a text list of ids ({error})") from error
    if not ids:
        raise DatasetError(f"{where}: list file is empty")
    for number, image_id in enumerate(ids, start=1):
        check_image_id(image_id, f"{where}, id {number}")
    return ids


def check_mask_values(mask: np.ndarray, where: str, num_classes: int) -> None:
    """Class ids ``0..num_classes-1`` and the ignore value 255 only; else an error naming the others."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_VALUE)]
    if bad.size:
        shown = ", ".join(str(value) for value in bad[:SHOWN_VALUES].tolist())
        raise DatasetError(f"{where}: mask values outside 0..{num_classes - 1} and {IGNORE_VALUE} ({shown})")


def decode_png_mask(data: bytes, where: str) -> np.ndarray:
    """A palette (or grayscale) PNG's ``(H, W)`` uint8 indices, never converted through RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            mask = np.array(image, dtype=np.uint8) if mode in ("P", "L") else None
    except Exception as error:  # PIL raises many kinds on damaged files: name the file
        raise DatasetError(f"{where}: unreadable mask PNG ({error})") from error
    if mask is None:
        raise DatasetError(f"{where}: a mask must be a palette or grayscale PNG, got mode {mode}")
    return mask


def read_sbd_segmentation(data: bytes, where: str) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/<id>.mat``, read as torchvision's ``SBDataset`` does
    (``loadmat(...)["GTcls"][0]["Segmentation"][0]``): an ``(H, W)`` integer array."""
    try:
        content = loadmat(io.BytesIO(data))
    except Exception as error:  # scipy raises ValueError, TypeError, MatReadError... on damaged files
        raise DatasetError(f"{where}: unreadable MATLAB file ({error})") from error
    struct = content.get(SBD_STRUCT)
    if struct is None:
        raise DatasetError(f"{where}: no '{SBD_STRUCT}' struct (SBD's cls/*.mat hold {SBD_STRUCT}.{SBD_FIELD}); "
                           f"found {sorted(name for name in content if not name.startswith('__'))}")
    if not isinstance(struct, np.ndarray) or struct.dtype.names is None or SBD_FIELD not in struct.dtype.names \
            or struct.size != 1:
        raise DatasetError(f"{where}: '{SBD_STRUCT}' is not a struct with a '{SBD_FIELD}' field")
    segmentation = np.asarray(struct[0][SBD_FIELD][0])
    if segmentation.ndim != 2 or segmentation.dtype.kind not in "iu":
        raise DatasetError(f"{where}: {SBD_STRUCT}.{SBD_FIELD} must be an (H, W) integer array, got "
                           f"{segmentation.dtype} {segmentation.shape}")
    return segmentation


def write_voc_mask(data: bytes, where: str, mask_path: Path, aug_path: Path, num_classes: int) -> None:
    """Check VOC's own mask, copy it as it is to ``mask_path`` and write it with the VOC colour map to
    ``aug_path`` (the augmented set's copy, the last written: its presence means both are done)."""
    mask = decode_png_mask(data, where)
    check_mask_values(mask, where, num_classes)
    atomic_write_bytes(mask_path, data)
    save_png(aug_path, mask, voc_palette())


def write_sbd_mask(data: bytes, where: str, aug_path: Path, num_classes: int) -> None:
    """Check an SBD ``.mat``'s segmentation and write it to ``aug_path`` as a VOC-palette PNG."""
    segmentation = read_sbd_segmentation(data, where)
    check_mask_values(segmentation, where, num_classes)
    save_png(aug_path, segmentation.astype(np.uint8), voc_palette())

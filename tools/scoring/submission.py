"""The PASCAL VOC evaluation server's package of segmentation results.

The server takes a ``.tar.gz`` of ``results/VOC2012/Segmentation/comp6_<split>_cls/<id>.png``, where
``<split>`` is ``test`` or ``val``: one 8-bit palette PNG per id of that whole list, with the VOC colour
map, class indices ``0..20`` and the size of its image. ``comp6`` is the category of methods trained with
outside data (ImageNet weights, SBD), where weakly supervised segmentation belongs.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tools.artifacts.files import ArtifactError, atomic_path, atomic_write_bytes
from tools.artifacts.paths import PNG_SUFFIX
from tools.data.descriptor import DatasetDescriptor
from tools.data.voc import VOCReader

COMPETITION = "comp6"
SPLITS = ("test", "val")  # the lists the server scores
RESULTS_ROOT = Path("results") / "VOC2012" / "Segmentation"
ARCHIVE_NAME = "results.tar.gz"


def submission_dir(pred_dir: Path, split: str) -> Path:
    """``<pred_dir>/results/VOC2012/Segmentation/comp6_<split>_cls``."""
    return pred_dir / RESULTS_ROOT / f"{COMPETITION}_{split}_cls"


def submission_split(descriptor: DatasetDescriptor, domain: str, list_ids: list[str] | None) -> str | None:
    """The server's split (``test`` / ``val``) of the ids a run made: the domain, or for a ``--list`` the split
    of the descriptor holding exactly its ids; None when they are not a whole split."""
    if list_ids is None:
        return domain if domain in SPLITS else None
    wanted = set(list_ids)
    return next((split for split in SPLITS if split in descriptor.lists and set(descriptor.read_ids(split)) == wanted),
                None)


def check_submission_png(path: Path, image_size: tuple[int, int], num_classes: int, palette: np.ndarray) -> None:
    """Mode P, the descriptor's colours for the classes, values ``0..num_classes-1``, the image's ``(H, W)``."""
    try:
        with Image.open(path) as label:
            mode, size, found_palette = label.mode, (label.height, label.width), label.getpalette() or []
            values = np.array(label) if mode == "P" else None
    except Exception as error:
        raise ArtifactError(f"{path}: unreadable submission PNG ({error})") from error
    if mode != "P":
        raise ArtifactError(f"{path}: the server needs a palette (mode P) PNG, found mode {mode}")
    expected = np.asarray(palette, dtype=np.uint8)[:num_classes].reshape(-1).tolist()
    if found_palette[: len(expected)] != expected:
        raise ArtifactError(f"{path}: the palette is not the dataset's colour map")
    if size != tuple(image_size):
        raise ArtifactError(f"{path}: size {size[1]}x{size[0]} differs from the image's "
                            f"{image_size[1]}x{image_size[0]}")
    if values.size and int(values.max()) >= num_classes:
        raise ArtifactError(f"{path}: value {int(values.max())} is not a class (0..{num_classes - 1})")


def write_submission(pred_dir: Path, ids: list[str], reader: VOCReader, split: str) -> Path:
    """Copy the predictions of ``ids`` into the server layout, check every file, pack ``results.tar.gz``.

    Returns the archive's path (inside ``pred_dir``); any problem is an ``ArtifactError`` naming the file.
    """
    descriptor = reader.descriptor
    folder = submission_dir(pred_dir, split)
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"{image_id}{PNG_SUFFIX}" for image_id in ids}
    extra = sorted(path.name for path in folder.iterdir() if path.name not in names)
    if extra:
        raise ArtifactError(f"{folder}: holds {len(extra)} file(s) not in the {split} list, first '{extra[0]}'; "
                            "remove them (the server rejects extra files)")
    for image_id in ids:
        source = pred_dir / f"{image_id}{PNG_SUFFIX}"
        if not source.is_file():
            raise ArtifactError(f"{source}: prediction missing; run the inference to the end first")
        target = folder / source.name
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)
        check_submission_png(target, reader.image_size(image_id), descriptor.num_classes, descriptor.palette)
    archive = pred_dir / ARCHIVE_NAME
    with atomic_path(archive) as temporary:
        with tarfile.open(temporary, "w:gz") as tar:
            for image_id in ids:
                path = folder / f"{image_id}{PNG_SUFFIX}"
                tar.add(path, arcname=str(path.relative_to(pred_dir)))
    return archive

"""Builds a tiny hand-made VOC layout (JPEG, XML, palette PNG, list, descriptor) for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tools.data.descriptor import voc_palette, write_descriptor

CLASS_NAMES = ["background", "cat", "dog", "car"]


def write_xml(path: Path, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    """``objects`` = [(name, (xmin, ymin, xmax, ymax)), ...]; size = (width, height)."""
    entries = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    path.write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"{entries}</annotation>"
    )


def write_mask(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    image.save(path)


def make_voc_layout(root: Path, num_images: int = 3, seed: int = 0) -> Path:
    """Write ``num_images`` images with one rectangle object each; returns the descriptor path."""
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "Annotations", "SegmentationClass"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(num_images):
        image_id = f"2007_{index:06d}"
        height, width = 40 + 8 * index, 56
        class_index = 1 + index % (len(CLASS_NAMES) - 1)
        x0, y0, x1, y1 = 10, 8, 40, 30
        photo = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        photo[y0:y1, x0:x1] = (200, 40 * class_index, 90)
        Image.fromarray(photo).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = class_index
        mask[y0, x0:x1] = 255
        write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        write_xml(root / "Annotations" / f"{image_id}.xml", (width, height),
                  [(CLASS_NAMES[class_index], (x0 + 1, y0 + 1, x1, y1))])
        ids.append(image_id)
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    descriptor = root / "dataset.json"
    write_descriptor(descriptor, "tiny", CLASS_NAMES, {"train": "train.txt"})
    return descriptor

"""Statistics of a VOC-layout dataset with a descriptor (``python -m tools.synthetic --stats DIR``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.data.descriptor import load_descriptor
from tools.data.voc import VOCReader


def dataset_statistics(root: str | Path) -> dict:
    """Per list file: image count and sizes, objects per image, images per class, pixel fractions.

    ``root`` holds ``dataset.json`` (any VOC-layout dataset with a descriptor works). Pixel fractions
    cover the ids that have a ``SegmentationClass`` mask; ``ignore`` is the share of 255.
    """
    descriptor = load_descriptor(Path(root) / "dataset.json")
    reader = VOCReader(descriptor)
    names = descriptor.class_names
    statistics = {"name": descriptor.name, "class_names": list(names), "splits": {}}
    for domain in descriptor.lists:
        ids = descriptor.read_ids(domain)
        objects, widths, heights = [], [], []
        images_per_class = np.zeros(descriptor.num_foreground, np.int64)
        pixels = np.zeros(256, np.int64)
        masks = 0
        for sample_id in ids:
            objects.append(len(reader.read_object_names(sample_id)))
            images_per_class += reader.load_label(sample_id).astype(np.int64)
            height, width = reader.image_size(sample_id)
            widths.append(width)
            heights.append(height)
            mask = reader.load_mask(sample_id)
            if mask is not None:
                pixels += np.bincount(mask.ravel(), minlength=256)
                masks += 1
        total = max(int(pixels.sum()), 1)
        fractions = {name: float(pixels[index]) / total for index, name in enumerate(names)}
        fractions["ignore"] = float(pixels[descriptor.ignore_index]) / total
        statistics["splits"][domain] = {
            "images": len(ids),
            "masks": masks,
            "width": {"min": min(widths), "max": max(widths)},
            "height": {"min": min(heights), "max": max(heights)},
            "objects_per_image": {"mean": float(np.mean(objects)), "min": min(objects), "max": max(objects)},
            "images_per_class": {name: int(count) for name, count in zip(names[1:], images_per_class)},
            "pixel_fraction": fractions,
        }
    return statistics


def format_statistics(statistics: dict) -> str:
    """Human-readable summary of ``dataset_statistics``."""
    lines = [f"dataset '{statistics['name']}': {len(statistics['class_names']) - 1} classes"]
    for domain, split in statistics["splits"].items():
        counts = split["objects_per_image"]
        lines.append(
            f"[{domain}] {split['images']} images ({split['masks']} masks), "
            f"size {split['width']['min']}-{split['width']['max']} x {split['height']['min']}-{split['height']['max']}, "
            f"objects/image mean {counts['mean']:.2f} min {counts['min']} max {counts['max']}"
        )
        lines.append("  images per class: " + ", ".join(f"{k} {v}" for k, v in split["images_per_class"].items()))
        lines.append("  pixel share: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in split["pixel_fraction"].items()))
    return "\n".join(lines)

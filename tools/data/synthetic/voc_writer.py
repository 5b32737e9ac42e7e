"""The synthetic dataset in the PASCAL VOC 2012 + SBD layout, written under ``out_dir``::

    JPEGImages/<id>.jpg            RGB photo
    Annotations/<id>.xml           VOC XML, one <object> per visible object, 1-based boxes
    SegmentationClass/<id>.png     palette PNG: 0 background, 1..K classes, 255 ignore band
    SegmentationClassAug/<id>.png  the same masks
    train_aug.txt, train.txt, val.txt
    dataset.json                   descriptor, written last
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.conventions import IGNORE_INDEX
from tools.artifacts.files import atomic_write_bytes, atomic_write_text, save_png
from tools.data.descriptor import voc_palette, write_descriptor
from tools.data.synthetic.render import CLASS_SPECS, Sample, check_arguments, jpeg_bytes, render_sample, sample_rng


def image_id(split: str, index: int) -> str:
    return f"syn_{split}_{index:06d}"


def annotation_xml(sample_id: str, sample: Sample) -> str:
    """VOC annotation of a sample's labelled objects."""
    height, width = sample.mask.shape
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "synthetic"
    ElementTree.SubElement(root, "filename").text = f"{sample_id}.jpg"
    size = ElementTree.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(size, key).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "1"
    for obj in sample.kept_objects:
        element = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(element, "name").text = obj.name
        ElementTree.SubElement(element, "pose").text = "Unspecified"
        ElementTree.SubElement(element, "truncated").text = str(int(obj.truncated))
        ElementTree.SubElement(element, "difficult").text = "0"
        box = ElementTree.SubElement(element, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ElementTree.SubElement(box, key).text = str(value)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n"



def write_sample(root: Path, sample_id: str, sample: Sample, palette: np.ndarray) -> None:
    """Write one sample's JPEG, XML and both mask PNGs, each atomically."""
    atomic_write_bytes(root / "JPEGImages" / f"{sample_id}.jpg", jpeg_bytes(sample.image))
    atomic_write_text(root / "Annotations" / f"{sample_id}.xml", annotation_xml(sample_id, sample))
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        save_png(root / folder / f"{sample_id}.png", sample.mask, palette)


def generate_dataset(
    out_dir: str | Path,
    num_classes: int = 6,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
    progress: bool = True,
) -> Path:
    """Write the whole dataset under ``out_dir``; returns the descriptor path (written last)."""
    check_arguments(num_classes, num_train, num_val, seed, min_size, max_size)
    root = Path(out_dir)
    palette = voc_palette()
    jobs = [("train", index) for index in range(num_train)] + [("val", index) for index in range(num_val)]
    for split, index in tqdm(jobs, desc="synthetic images", disable=not progress):
        sample = render_sample(sample_rng(seed, split, index), num_classes, min_size, max_size)
        write_sample(root, image_id(split, index), sample, palette)
    train_ids = [image_id("train", index) for index in range(num_train)]
    lists = {
        "train": train_ids[: max(1, num_train // 4)],
        "train_aug": train_ids,
        "val": [image_id("val", index) for index in range(num_val)],
    }
    for domain, ids in lists.items():
        atomic_write_text(root / f"{domain}.txt", "\n".join(ids) + "\n")
    descriptor = root / "dataset.json"
    write_descriptor(
        descriptor,
        name="synthetic",
        class_names=["background", *(spec.name for spec in CLASS_SPECS[:num_classes])],
        lists={domain: f"{domain}.txt" for domain in lists},
        data_dir=".",
        ignore_index=IGNORE_INDEX,
    )
    return descriptor

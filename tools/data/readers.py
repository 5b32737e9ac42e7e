"""The reader of a dataset's layout: VOC folders or a COCO index (no torch: ``evaluate.py`` uses it too)."""
from __future__ import annotations

from pathlib import Path

from tools.data.coco import COCOReader
from tools.data.descriptor import COCO_LAYOUT, DatasetDescriptor
from tools.data.voc import VOCReader


def make_reader(descriptor: DatasetDescriptor, data_dir: str | Path | None = None) -> VOCReader:
    """The reader of the descriptor's layout and dataset root (``data_dir`` overrides the descriptor's):
    ``COCOReader`` for ``"layout": "coco"``, else ``VOCReader``."""
    if descriptor.layout == COCO_LAYOUT:
        return COCOReader(descriptor, data_dir)
    return VOCReader(descriptor, data_dir)

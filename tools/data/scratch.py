"""A scratch copy of a dataset's descriptor whose lists hold a few ids each (``run_pipeline.py --preflight``).

The copy points at the real data root (and COCO index), so the stages read the real photos and masks at their
real sizes; only the lists are cut, each to its first ``count`` ids plus the ids kept for the lists it
contains (``train_aug`` contains ``train``, so CAMs made on the cut ``train_aug`` can be scored on the cut
``train``, as in the full run). A list file that does not exist stays out of the copy, so a stage that needs
it fails as it would on the real descriptor.
"""
from __future__ import annotations

import json
from pathlib import Path

from tools.artifacts.files import atomic_write_text
from tools.data.descriptor import DatasetDescriptor, read_json_object

DESCRIPTOR_NAME = "dataset.json"
LIST_SUFFIX = ".txt"


def cut_lists(lists: dict[str, list[str]], count: int) -> dict[str, list[str]]:
    """Each list's first ``count`` ids, plus those kept for the lists it contains, in the list's own order.
    Lists are cut from the shortest up, so a contained list is cut before the lists that contain it."""
    members = {domain: set(ids) for domain, ids in lists.items()}
    kept: dict[str, list[str]] = {}
    for domain in sorted(lists, key=lambda name: (len(lists[name]), name)):
        keep = set(lists[domain][:count])
        for other, ids in kept.items():
            if members[other] <= members[domain]:
                keep.update(ids)
        kept[domain] = [image_id for image_id in lists[domain] if image_id in keep]
    return kept


def write_scratch_dataset(descriptor: DatasetDescriptor, data_dir: str | Path, folder: Path, count: int) -> Path:
    """Write ``folder/dataset.json`` and its cut lists (``cut_lists``) for ``descriptor`` with its data root at
    ``data_dir``; returns the descriptor's path."""
    raw = read_json_object(descriptor.path, "dataset descriptor not found", "a descriptor is a JSON object")
    lists = {domain: descriptor.read_ids(domain) for domain, path in descriptor.lists.items() if path.is_file()}
    for domain, ids in cut_lists(lists, count).items():
        atomic_write_text(folder / f"{domain}{LIST_SUFFIX}", "".join(f"{image_id}\n" for image_id in ids))
    raw.update(data_dir=str(Path(data_dir).absolute()), lists={domain: f"{domain}{LIST_SUFFIX}" for domain in lists})
    if descriptor.index_file is not None:
        raw["index_file"] = str(descriptor.index_file.absolute())
    path = folder / DESCRIPTOR_NAME
    atomic_write_text(path, json.dumps(raw, indent=2) + "\n")
    return path

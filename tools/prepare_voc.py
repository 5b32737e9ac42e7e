"""PASCAL VOC 2012 and SBD for the pipeline, from the two downloads, by one command.

    python -m tools.prepare_voc --download --out ../VOC2012 [--workers 16]
    python -m tools.prepare_voc --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out ../VOC2012

``--voc`` and ``--sbd`` are each the downloaded archive or the folder it unpacks to; ``--download``
fetches the ones not given. Writes into ``--out``::

    JPEGImages/<id>.jpg, Annotations/<id>.xml  VOC's photos and XMLs, copied (SBD's photos are VOC's)
    SegmentationClass/<id>.png                 VOC's own masks, copied (2,913; 255 band on object borders)
    SegmentationClassAug/<id>.png              VOC-palette masks: VOC's own where it has one, else SBD's
                                               cls/<id>.mat GTcls.Segmentation (12,031)
    train.txt, val.txt                         VOC's ImageSets/Segmentation lists (1,464 and 1,449 ids)
    train_aug.txt                              (VOC train | SBD train | SBD val) - VOC val, sorted (10,582)
    prepare_voc.json                           the counts and how the lists compare with data/voc12/
    dataset.json                               descriptor (VOC's 21 classes), written last

The rules:

- archives: a given archive under its published name (``VOCtrainval_11-May-2012.tar``,
  ``benchmark.tgz``) must have the published MD5 (torchvision's constants); an archive under another
  name (one made by hand, the tests') is not checked. ``--download`` fetches with torchvision's
  ``download_url`` into ``<out>/downloads/``, which checks the MD5 and skips a file already there.
- an archive is streamed once, front to back, and never unpacked to disk (see ``tools.data.voc_archives``);
  SBD's ``img/`` (the same photos as VOC's) and ``inst/`` are not read.
- lists: each is compared with ``data/voc12/<list>.txt`` (``--reference_lists``): a difference is a
  warning naming the counts and first ids only in one of them (on the real downloads they are equal).
- bad input is a one-line error naming the file: a checksum, a missing folder, list file, photo, XML
  or mask of a listed id, a ``.mat`` without ``GTcls.Segmentation``, a mask value outside 0..20 and
  255, a damaged archive. Files written before it are complete; the descriptor is not written.
- a rerun (after a kill, say) writes only the files that do not exist (``--overwrite`` rewrites them;
  every file is written atomically, so an existing one is complete) and the lists, report and
  descriptor identically; the descriptor is removed first and written last, so it means done.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tools.artifacts.files import atomic_write_bytes, atomic_write_text
from tools.artifacts.paths import PNG_SUFFIX
from tools.cli.arguments import StageArgumentParser, positive_int
from tools.cli.exits import run_main
from tools.data.descriptor import DEFAULT_DESCRIPTOR, DatasetError, load_descriptor, read_id_list, write_descriptor
from tools.data.voc_archives import Layout, Member, Source, parse_ids, write_sbd_mask, write_voc_mask
from tools.scoring.parallel import BackgroundJobs, default_jobs

VOC_YEAR = "2012"
PHOTOS, XMLS, MASKS, AUG_MASKS = "JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug"
VOC_LISTS, SBD_MASKS, SBD_LISTS = "ImageSets/Segmentation", "cls", ""
VOC_LAYOUT = Layout(("VOCdevkit", "VOC2012"), PHOTOS,
                    {PHOTOS: "*.jpg", XMLS: "*.xml", MASKS: f"*{PNG_SUFFIX}", VOC_LISTS: "*.txt"})
SBD_LAYOUT = Layout(("benchmark_RELEASE", "dataset"), SBD_MASKS, {SBD_MASKS: "*.mat", SBD_LISTS: "*.txt"})
SPLITS = ("train", "val")  # the list files VOC's ImageSets/Segmentation and SBD each have
AUG_LIST = "train_aug"
DESCRIPTOR_LISTS = {name: f"{name}.txt" for name in ("train", "val", AUG_LIST)}
DESCRIPTOR_FILE, REPORT_FILE, DOWNLOAD_FOLDER = "dataset.json", "prepare_voc.json", "downloads"
DATASET_NAME = "voc12"
SHOWN_IDS = 3  # ids named in a list comparison
REFERENCE_LISTS = DEFAULT_DESCRIPTOR.parent  # data/voc12: the lists of the real downloads
PUBLISHED_NAMES = {"--voc": "VOCtrainval_11-May-2012.tar", "--sbd": "benchmark.tgz"}  # torchvision's too


@dataclass(frozen=True)
class Download:
    """A published archive: the flag that gives it instead, and torchvision's URL, file name and MD5."""

    flag: str
    url: str
    filename: str
    md5: str


@functools.cache
def published_downloads() -> dict[str, Download]:
    """The two archives by flag, as torchvision publishes them. torchvision is imported here, not at the
    top: it brings torch, 4 s of start-up that only a download or a checksum needs."""
    from torchvision.datasets import SBDataset
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    voc = DATASET_YEAR_DICT[VOC_YEAR]
    return {"--voc": Download("--voc", voc["url"], voc["filename"], voc["md5"]),
            "--sbd": Download("--sbd", SBDataset.url, SBDataset.filename, SBDataset.md5)}


@dataclass
class Found:
    """What one pass over an input found: the ids in each of its folders, and its split lists."""

    source: Source
    list_folder: str
    ids: dict[str, set[str]] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)

    def folder_ids(self, folder: str) -> set[str]:
        return self.ids.get(folder, set())

    def require(self) -> None:
        """Every folder of the layout has files and every split list was there."""
        for folder, pattern in self.source.layout.members.items():
            if folder != self.list_folder and not self.folder_ids(folder):
                raise DatasetError(f"{self.source.where(folder)}: no {pattern} files (a wrong or damaged input)")
        for name in SPLITS:
            if name not in self.lists:
                list_file = f"{self.list_folder}/{name}.txt" if self.list_folder else f"{name}.txt"
                raise DatasetError(f"{self.source.where(list_file)}: not found")


@dataclass(frozen=True)
class Writer:
    """Writes what the members hold into ``out_dir``: photos and XMLs here, masks on ``jobs``; files that
    exist are skipped unless ``overwrite``."""

    out_dir: Path
    jobs: BackgroundJobs
    num_classes: int
    overwrite: bool

    def _to_write(self, *paths: Path) -> bool:
        """With ``overwrite`` always, else when one of the paths does not exist."""
        return self.overwrite or not all(path.exists() for path in paths)

    def voc_member(self, member: Member) -> None:
        """A photo or XML copied; a mask checked, copied and written to the augmented set."""
        if member.folder in (PHOTOS, XMLS):
            path = self.out_dir / member.folder / member.file_name
            if self._to_write(path):
                atomic_write_bytes(path, member.read())
            return
        mask, aug = (self.out_dir / folder / f"{member.stem}{PNG_SUFFIX}" for folder in (MASKS, AUG_MASKS))
        if self._to_write(mask, aug):
            self.jobs.submit(write_voc_mask, member.read(), member.where, mask, aug, self.num_classes)

    def sbd_member(self, voc_masks: set[str], member: Member) -> None:
        """An SBD mask is written only where VOC has none of its own."""
        aug = self.out_dir / AUG_MASKS / f"{member.stem}{PNG_SUFFIX}"
        if member.stem not in voc_masks and self._to_write(aug):
            self.jobs.submit(write_sbd_mask, member.read(), member.where, aug, self.num_classes)


def read_input(source: Source, list_folder: str, write: Callable[[Member], None]) -> Found:
    """One pass over an input: the split lists read, every other member recorded and handed to ``write``."""
    found = Found(source, list_folder)
    with contextlib.closing(source.members()) as members:  # on an error, too: the progress bar ends its line
        for member in members:
            if member.folder == list_folder:
                if member.stem in SPLITS:
                    found.lists[member.stem] = parse_ids(member.read(), member.where)
                continue
            found.ids.setdefault(member.folder, set()).add(member.stem)
            write(member)
    found.require()
    return found


def derive_lists(voc: Found, sbd: Found) -> dict[str, list[str]]:
    """VOC's train and val as listed, and train_aug: the ids of VOC train and both SBD lists that are not
    in VOC val, sorted (as ``data/voc12/train_aug.txt``)."""
    train, val = (voc.lists[name] for name in SPLITS)
    train_aug = sorted(set(train).union(*(sbd.lists[name] for name in SPLITS)) - set(val))
    return {"train": train, "val": val, AUG_LIST: train_aug}


def check_members(lists: dict[str, list[str]], voc: Found, sbd: Found) -> None:
    """Every listed id has its photo and XML in VOC and a mask: VOC's own for train and val, VOC's or
    SBD's for train_aug; else an error naming the first missing file."""
    for name, ids in lists.items():
        for image_id in ids:
            listed = f"of id '{image_id}' of the {name} list"
            for folder, suffix, what in ((PHOTOS, ".jpg", "photo"), (XMLS, ".xml", "XML")):
                if image_id not in voc.folder_ids(folder):
                    raise DatasetError(f"{voc.source.where(f'{folder}/{image_id}{suffix}')}: not found, the {what} "
                                       f"{listed}")
            if image_id in voc.folder_ids(MASKS) or (name == AUG_LIST and image_id in sbd.folder_ids(SBD_MASKS)):
                continue
            missing = voc.source.where(f"{MASKS}/{image_id}{PNG_SUFFIX}")
            if name == AUG_LIST:
                missing = f"{sbd.source.where(f'{SBD_MASKS}/{image_id}.mat')} (nor {missing})"
            raise DatasetError(f"{missing}: not found, the mask {listed}")


def _only(ids: list[str], where: str) -> str:
    """``'2 only here (first: a, b)'``: a count of ids and the first few."""
    return f"{len(ids):,} only {where}" + (f" (first: {', '.join(ids[:SHOWN_IDS])})" if ids else "")


def compare_with_reference(name: str, ids: list[str], reference: Path, expected: list[str]) -> dict:
    """How a derived list compares with the repository's, ``expected`` read from ``reference``: printed (a
    difference as a warning) and returned."""
    only_here, only_there = sorted(set(ids) - set(expected)), sorted(set(expected) - set(ids))
    if ids == expected:
        print(f"{name}: {len(ids):,} ids, as {reference}")
    elif not only_here and not only_there:
        print(f"warning: {name}: the ids of {reference} in another order", file=sys.stderr)
    else:
        print(f"warning: {name}: {len(ids):,} ids, {len(expected):,} in {reference}: {_only(only_here, 'here')}, "
              f"{_only(only_there, f'in {reference.name}')}", file=sys.stderr)
    return {"reference": str(reference), "equal": ids == expected, "only_here": len(only_here),
            "only_in_reference": len(only_there), "first_only_here": only_here[:SHOWN_IDS],
            "first_only_in_reference": only_there[:SHOWN_IDS]}


def prepare(voc_path: Path, sbd_path: Path, out_dir: Path, workers: int,
            reference_dir: Path = REFERENCE_LISTS, overwrite: bool = False) -> Path:
    """Read both inputs, writing photos, XMLs and masks as they come, then check and write the lists, the
    report and the descriptor; returns the descriptor's path."""
    class_names = load_descriptor(DEFAULT_DESCRIPTOR).class_names  # VOC's 21, named once in data/voc12/
    references = {name: reference_dir / file_name for name, file_name in DESCRIPTOR_LISTS.items()}
    expected = {name: read_id_list(path) for name, path in references.items()}  # a missing one fails early
    voc_source, sbd_source = Source(voc_path, VOC_LAYOUT), Source(sbd_path, SBD_LAYOUT)
    descriptor = out_dir / DESCRIPTOR_FILE
    descriptor.unlink(missing_ok=True)
    with BackgroundJobs(workers) as jobs:
        writer = Writer(out_dir, jobs, len(class_names), overwrite)
        voc = read_input(voc_source, VOC_LISTS, writer.voc_member)
        sbd = read_input(sbd_source, SBD_LISTS, functools.partial(writer.sbd_member, voc.folder_ids(MASKS)))
    lists = derive_lists(voc, sbd)
    check_members(lists, voc, sbd)
    for name, ids in lists.items():
        atomic_write_text(out_dir / DESCRIPTOR_LISTS[name], "\n".join(ids) + "\n")
    voc_masks, sbd_masks = voc.folder_ids(MASKS), sbd.folder_ids(SBD_MASKS) - voc.folder_ids(MASKS)
    report = {
        "inputs": {"voc": str(voc_path.resolve()), "sbd": str(sbd_path.resolve())},
        "photos": len(voc.folder_ids(PHOTOS)),
        "annotations": len(voc.folder_ids(XMLS)),
        "masks": {"voc": len(voc_masks), "sbd": len(sbd_masks), "aug": len(voc_masks) + len(sbd_masks)},
        "lists": {name: len(ids) for name, ids in lists.items()},
        "comparison": {name: compare_with_reference(name, ids, references[name], expected[name])
                       for name, ids in lists.items()},
    }
    print(f"{report['photos']:,} photos, {report['annotations']:,} XMLs; masks: {len(voc_masks):,} from VOC, "
          f"{len(sbd_masks):,} from SBD, {len(voc_masks) + len(sbd_masks):,} in {AUG_MASKS}; lists: "
          + ", ".join(f"{name} {len(ids):,}" for name, ids in lists.items()))
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    write_descriptor(descriptor, DATASET_NAME, list(class_names), DESCRIPTOR_LISTS)
    return descriptor


# ----------------------------------------------------------------------------- archives and the command line
def fetch(download: Download, folder: Path) -> Path:
    """The published archive in ``folder``, downloaded unless it is there with its MD5."""
    from torchvision.datasets.utils import download_url  # see published_downloads

    print(f"{download.filename}: from {download.url} to {folder}")
    try:
        download_url(download.url, str(folder), download.filename, download.md5)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError; a bad MD5 a RuntimeError
        raise DatasetError(f"{download.url}: download failed ({error}); download {download.filename} "
                           f"yourself and pass {download.flag}") from error
    return folder / download.filename


def check_published(path: Path, flag: str) -> None:
    """A given archive under its published file name must have the published MD5."""
    if path.is_file() and path.name == PUBLISHED_NAMES[flag]:
        from torchvision.datasets.utils import check_integrity  # see published_downloads

        download = published_downloads()[flag]
        print(f"{path}: checking its MD5")
        if not check_integrity(path, download.md5):
            raise DatasetError(f"{path}: its MD5 is not the published {download.md5} (a damaged or another "
                               f"file: download it again, or use --download)")


def _inputs_given(args: argparse.Namespace) -> str | None:
    if args.download and args.voc is not None and args.sbd is not None:
        return "--download fetches the archives that --voc and --sbd do not give; both are given"
    if not args.download and (args.voc is None or args.sbd is None):
        return "give both --voc and --sbd, or --download for the ones not given"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--voc", type=Path,
                        help=f"VOC 2012 trainval: {PUBLISHED_NAMES['--voc']} or its unpacked folder")
    parser.add_argument("--sbd", type=Path, help=f"SBD: {PUBLISHED_NAMES['--sbd']} or its unpacked folder")
    parser.add_argument("--out", type=Path, required=True,
                        help="dataset root to write (../VOC2012 is the one data/voc12/dataset.json names)")
    parser.add_argument("--download", action="store_true",
                        help=f"download the archives not given into <out>/{DOWNLOAD_FOLDER}/ (kept for reruns)")
    parser.add_argument("--workers", type=positive_int, default=default_jobs(),
                        help="processes writing masks (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that exist")
    parser.add_argument("--reference_lists", type=Path, default=REFERENCE_LISTS,
                        help="folder of the train, val and train_aug lists to compare with (default: data/voc12)")
    parser.add_check(_inputs_given)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    inputs = []
    for flag, given in (("--voc", args.voc), ("--sbd", args.sbd)):
        if given is None:
            inputs.append(fetch(published_downloads()[flag], args.out / DOWNLOAD_FOLDER))
        else:
            check_published(given, flag)
            inputs.append(given)
    descriptor = prepare(*inputs, args.out, args.workers, args.reference_lists, args.overwrite)
    print(f"Next: python run_pipeline.py --recipe voc --data_dir {args.out}\n"
          f"      python train_caae.py --dataset {descriptor}")  # or any other stage with this --dataset


if __name__ == "__main__":
    run_main(main)

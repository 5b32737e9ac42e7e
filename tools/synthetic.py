"""Synthetic weakly-supervised segmentation dataset in the PASCAL VOC layout (or MS COCO 2014's).

Every stage runs on it unchanged, so the whole pipeline can be trained and tested on a CPU in
minutes. The renderer is ``tools/data/synthetic/render.py``; the writers of the two layouts are
``voc_writer.py`` and ``coco_writer.py`` beside it.

``--format voc`` (default) writes the VOC 2012 + SBD layout with masks, lists and a descriptor;
``--format coco`` MS COCO 2014's photos and instances JSON (for ``tools.prepare_coco``). The writers'
docstrings list the files.

Usage (the second line makes a VOC-like set: 20 classes, VOC-sized photos)::

    python -m tools.synthetic --out demo_data/synthetic --num_classes 6
    python -m tools.synthetic --out DIR --num_classes 20 --num_train 1464 --num_val 1449 --min_size 375 --max_size 500
    python -m tools.synthetic --stats demo_data/synthetic
    python -m tools.synthetic --format coco --out demo_data/synthetic_coco
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.cli.arguments import StageArgumentParser, UsageError
from tools.cli.exits import run_main
from tools.data.synthetic.coco_writer import generate_coco_dataset
from tools.data.synthetic.render import MAX_CLASSES
from tools.data.synthetic.statistics import dataset_statistics, format_statistics
from tools.data.synthetic.voc_writer import generate_dataset

FORMATS = ("voc", "coco")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    parser.add_argument("--out", type=Path, help="dataset root to write")
    parser.add_argument("--format", choices=FORMATS, default="voc",
                        help="voc: the VOC 2012 + SBD layout with masks and descriptor; coco: MS COCO 2014's "
                             "photos and instances JSON, for python -m tools.prepare_coco")
    parser.add_argument("--stats", type=Path, metavar="DIR", help="only print the statistics of an existing set")
    parser.add_argument("--num_classes", type=int, default=6, help=f"object classes, 1..{MAX_CLASSES}")
    parser.add_argument("--num_train", type=int, default=400, help="train_aug images (train.txt: the first quarter)")
    parser.add_argument("--num_val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_size", type=int, default=96, help="smallest width / height in pixels")
    parser.add_argument("--max_size", type=int, default=192, help="largest width / height in pixels")
    args = parser.parse_args(argv)
    if args.stats is None and args.out is None:
        parser.error("give --out DIR to generate a dataset or --stats DIR to describe one")
    if args.stats is not None and args.format != "voc":
        parser.error("--stats describes a VOC-layout set; prepare a COCO-layout one with tools.prepare_coco")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stats is not None:
        print(format_statistics(dataset_statistics(args.stats)))
        return
    generate = generate_coco_dataset if args.format == "coco" else generate_dataset
    try:
        generate(args.out, args.num_classes, args.num_train, args.num_val, args.seed, args.min_size, args.max_size)
    except ValueError as error:  # the generator's own checks of the flags
        raise UsageError(str(error)) from error
    if args.format == "coco":
        print(f"Next: python -m tools.prepare_coco --coco_dir {args.out} --out {args.out / 'prepared'}")
        return
    print(format_statistics(dataset_statistics(args.out)))


if __name__ == "__main__":
    run_main(main)

"""Run a whole recipe, from image-level labels to the final segmentation model, as the stage commands.

    python run_pipeline.py --recipe demo                      # synthetic set, CPU, under demo_data/ (make demo)
    python run_pipeline.py --recipe voc --gpus 4              # the paper's settings under torchrun
    python run_pipeline.py --recipe voc --dry_run             # print the commands only
    python run_pipeline.py --recipe demo --from random_walk --to pseudo_labels
    python run_pipeline.py --recipe voc --preflight           # every stage at full size on 8 images, timed
    python run_pipeline.py --recipe voc --pretrained none --stage_flags caae="--batch_size 32"

Each command is printed before it runs, its output kept in ``<experiments>/logs/pipeline@<recipe>/``.
Finished stages (complete outputs with the same provenance) are skipped, so a rerun after a crash or
a kill continues where it stopped, and a stage whose settings or inputs changed runs again, with
every stage after it. Paths in a recipe are relative to the repository root, paths given here to the
current folder. ``--preflight`` runs every stage at its full sizes on the first few ids of each list
into a scratch folder and prints each stage's time per step or image, peak memory, artifact size and the
full run's projected time and disk. Recipes are ``data/recipes/<name>.json``; see ``tools/pipeline.py``
and ``tools/preflight/driver.py``.
"""
from __future__ import annotations

import argparse

from tools.cli.arguments import StageArgumentParser, non_negative_int, positive_int
from tools.cli.exits import run_main
from tools.pipeline import ALL_STAGES, Overrides, Settings, load_recipe, recipe_names, run_recipe
from tools.preflight.driver import DEFAULT_IMAGES, DEFAULT_STEPS, check_arguments, run_preflight
from tools.report import write_report

MIN_PREFLIGHT_IMAGES = 2  # the first image of a process is its warm-up, untimed


def at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < MIN_PREFLIGHT_IMAGES:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_PREFLIGHT_IMAGES} (the first image is not timed), "
                                         f"got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--recipe", required=True,
                        help=f"{' | '.join(recipe_names())} (data/recipes/<name>.json), or the path of your own .json")
    parser.add_argument("--data_dir", default=None, help="dataset root (default: the recipe's)")
    parser.add_argument("--dataset", default=None, metavar="PATH",
                        help="dataset descriptor (default: the recipe's), e.g. the dataset.json of a set made "
                             "elsewhere")
    parser.add_argument("--experiments_dir", default=None,
                        help="artifacts root (default: the recipe's, else experiments/)")
    parser.add_argument("--processes", "--gpus", dest="processes", type=non_negative_int, default=None,
                        help="processes per node for the recipe's training and inference stages (torchrun): one per "
                             "GPU, or on a CPU one-thread processes (the demo's 2 use 2 cores better than one "
                             "2-thread process); 0: plain python; default: the recipe's \"cpu_processes\" on a machine "
                             "without CUDA, else 0")
    parser.add_argument("--pretrained", default=None, metavar="none|timm|imagenet|PATH",
                        help="passed to every stage whose script takes --pretrained (the ViT stages: timm|none|PATH, "
                             "the ResNet stages: imagenet|none|PATH); none trains from scratch, offline")
    parser.add_argument("--stage_flags", action="append", default=[], metavar="STAGE=FLAGS",
                        help=f"flags added to one stage's command, after the recipe's (so they win), e.g. "
                             f"caae='--batch_size 32'; {ALL_STAGES}=FLAGS: each option to every stage that takes it, "
                             "e.g. '*=--num_workers 2'; repeatable; paths in them are read from the repository root")
    parser.add_argument("--from", dest="first", default=None, help="first stage to run (by name)")
    parser.add_argument("--to", dest="last", default=None, help="last stage to run (by name)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--force", action="store_true",
                        help="redo the chosen stages even if done (after a code change)")
    parser.add_argument("--preflight", action="store_true",
                        help="run every stage at its full sizes on the first --preflight_images ids of each list, "
                             "into a scratch folder removed afterwards; print time per step / image, peak memory, "
                             "artifact sizes and the full run's projected time and disk (run this before a long job)")
    parser.add_argument("--preflight_images", type=at_least_two, default=DEFAULT_IMAGES, metavar="N",
                        help="ids per list in the preflight (training stages repeat them to fill their batches)")
    parser.add_argument("--preflight_steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                        help="timed optimiser steps per training stage in the preflight, after one warm-up step")
    parser.add_argument("--preflight_lists", default=None, metavar="DESCRIPTOR",
                        help="project the full run onto the list sizes of this dataset descriptor (only its list "
                             "files are read), e.g. data/voc12/dataset.json for a preflight on a synthetic set")
    parser.add_check(check_arguments)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe)
    settings = Settings.from_recipe(recipe, args.data_dir, args.experiments_dir, args.processes, args.dataset)
    overrides = Overrides.from_arguments(args.pretrained, args.stage_flags)
    if args.preflight:
        run_preflight(args.recipe, settings, overrides, args.preflight_images, args.preflight_steps,
                      args.preflight_lists)
        return
    run_recipe(args.recipe, settings, args.first, args.last, args.dry_run, args.force, overrides)
    if not args.dry_run:
        print(f"report: {write_report(args.recipe, settings)}")


if __name__ == "__main__":
    run_main(main)

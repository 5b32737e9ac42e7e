"""Run a whole recipe, from image-level labels to the final segmentation model, as the stage commands.

    python run_pipeline.py --recipe demo                      # synthetic set, CPU, under demo_data/ (make demo)
    python run_pipeline.py --recipe voc --gpus 4              # the paper's settings under torchrun
    python run_pipeline.py --recipe voc --dry_run             # print the commands only
    python run_pipeline.py --recipe demo --from random_walk --to pseudo_labels

Each command is printed before it runs, its output kept in ``<experiments>/logs/pipeline@<recipe>/``.
Finished stages (complete outputs with the same provenance) are skipped, so a rerun after a crash or
a kill continues where it stopped, and a stage whose settings or inputs changed runs again, with
every stage after it. Recipes are ``data/recipes/<name>.json``; see ``tools/pipeline.py``.
"""
from __future__ import annotations

import argparse

from tools.cli.arguments import StageArgumentParser, non_negative_int
from tools.cli.exits import run_main
from tools.pipeline import Settings, load_recipe, recipe_names, run_recipe
from tools.report import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--recipe", required=True,
                        help=f"{' | '.join(recipe_names())} (data/recipes/<name>.json), or the path of your own .json")
    parser.add_argument("--data_dir", default=None, help="dataset root (default: the recipe's)")
    parser.add_argument("--experiments_dir", default=None,
                        help="artifacts root (default: the recipe's, else experiments/)")
    parser.add_argument("--gpus", type=non_negative_int, default=0,
                        help="processes per node for training and inference (torchrun); 0: plain python")
    parser.add_argument("--from", dest="first", default=None, help="first stage to run (by name)")
    parser.add_argument("--to", dest="last", default=None, help="last stage to run (by name)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--force", action="store_true",
                        help="redo the chosen stages even if done (after a code change)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe)
    settings = Settings.from_recipe(recipe, args.data_dir, args.experiments_dir, args.gpus)
    run_recipe(args.recipe, settings, args.first, args.last, args.dry_run, args.force)
    if not args.dry_run:
        print(f"report: {write_report(args.recipe, settings)}")


if __name__ == "__main__":
    run_main(main)

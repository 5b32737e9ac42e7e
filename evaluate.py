"""Score CAMs, random-walk maps or label PNGs against the ground truth (mIoU, FP, FN).

    python evaluate.py --experiment_name SemFormer@CAAE@DeiT-B-Dist@train@scale=0.5,1.0,1.5,2.0 --domain train

sweeps the background threshold over 0.10..0.40 (31 values, inclusive) with the original's 7x7
erosion, prints the per-class IoU of the best threshold and one line per threshold, and writes
``evaluation_<domain>_<mode>.json`` and ``.png`` (mIoU / FP / FN against the threshold) into the
prediction folder's ``reports/`` subfolder, away from its ``<id>.png`` / ``<id>.npz`` files. ``--mode png``
scores label maps (pseudo labels, segmentation outputs) as they are.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.artifacts.files import ArtifactError
from tools.artifacts.paths import ExperimentPaths, reports_dir
from tools.cli.arguments import StageArgumentParser, finite_float, non_negative_int, positive_float
from tools.cli.exits import run_main
from tools.cli.stage_data import add_dataset_args, add_jobs_arg
from tools.data.descriptor import load_descriptor, read_id_list
from tools.scoring.evaluation import (MODES, POST_PROCESSES, SWEEP, EvaluationConfig, evaluate, format_report,
                                      plot_sweep, summarise, sweep_thresholds, write_json)
from tools.scoring.metrics import MEAN_OVER


def build_parser() -> argparse.ArgumentParser:
    parser = StageArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    source = parser.add_argument_group("predictions")
    source.add_argument("--experiment_name", help="folder under <experiments_dir>/predictions/")
    source.add_argument("--pred_dir", help="score this folder instead of the experiment's")
    source.add_argument("--mode", choices=MODES, default="npy",
                        help="npy: the .npz score maps (rw if present, else hr_cam); rw: the rw array; png: <id>.png label maps")
    source.add_argument("--allow_pickle", action="store_true",
                        help="read the original repository's pickled .npy dicts (only files you trust)")
    add_dataset_args(parser)
    parser.add_argument("--gt_dir", help="GT masks (default: <data_dir>/SegmentationClass)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--threshold", type=finite_float, help="a single background threshold (no sweep)")
    protocol.add_argument("--min_th", type=finite_float, default=SWEEP[0])
    protocol.add_argument("--max_th", type=finite_float, default=SWEEP[1], help="inclusive")
    protocol.add_argument("--step", type=positive_float, default=SWEEP[2])
    protocol.add_argument("--crf_iteration", type=non_negative_int, default=0, help="label-CRF iterations; 0 = no CRF")
    protocol.add_argument("--mean_over", choices=MEAN_OVER, default="all",
                          help="all: mean over every class of the descriptor, a class absent from GT and "
                               "prediction counting 0 (the original); present: over the classes that occur")
    protocol.add_argument("--post_process", choices=POST_PROCESSES, default="erode",
                          help="without CRF: erode every region by 3 px as the original does, or nothing")
    add_jobs_arg(parser)
    parser.add_argument("--output_dir", help="where the JSON and plot go (default: <prediction folder>/reports)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the result dict that is also written as JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.pred_dir and not args.experiment_name:
        parser.error("give --experiment_name or --pred_dir")
    if args.crf_iteration < 0:
        parser.error(f"--crf_iteration must be >= 0, got {args.crf_iteration}")
    if args.n_jobs < 1:
        parser.error(f"--n_jobs must be >= 1, got {args.n_jobs}")

    descriptor = load_descriptor(args.dataset)
    if args.pred_dir:
        pred_dir = Path(args.pred_dir)
    else:
        pred_dir = ExperimentPaths(Path(args.experiments_dir)).predictions(args.experiment_name)
    if not pred_dir.is_dir():
        raise ArtifactError(f"{pred_dir}: prediction folder not found")
    ids = read_id_list(args.list) if args.list else descriptor.read_ids(args.domain)
    needs_photos = args.mode != "png" and args.crf_iteration > 0
    data_dir = descriptor.resolve_data_dir(args.data_dir) if (needs_photos or not args.gt_dir) else None
    if args.mode == "png":
        thresholds: tuple[float, ...] = ()
    elif args.threshold is not None:
        thresholds = (args.threshold,)
    else:
        try:
            thresholds = sweep_thresholds(args.min_th, args.max_th, args.step)
        except ValueError as error:
            parser.error(str(error))

    config = EvaluationConfig(
        pred_dir=pred_dir,
        gt_dir=Path(args.gt_dir) if args.gt_dir else data_dir / descriptor.mask_dir,
        mode=args.mode,
        thresholds=thresholds,
        num_classes=descriptor.num_classes,
        ignore_index=descriptor.ignore_index,
        crf_iteration=args.crf_iteration,
        post_process=args.post_process,
        dataset=Path(args.dataset) if needs_photos else None,
        data_dir=data_dir if needs_photos else None,
        allow_pickle=args.allow_pickle,
        mean_over=args.mean_over,
    )
    scores = evaluate(config, ids, n_jobs=args.n_jobs)
    result = summarise(scores, thresholds, descriptor.class_names)
    result["settings"] = {
        "pred_dir": str(pred_dir),
        "gt_dir": str(config.gt_dir),
        "ids": args.list or args.domain,
        "num_images": len(ids),
        "mode": args.mode,
        "mean_over": args.mean_over,
        "crf_iteration": args.crf_iteration,
        "post_process": args.post_process if args.mode != "png" and args.crf_iteration == 0 else "none",
    }
    print(format_report(result))

    output_dir = Path(args.output_dir) if args.output_dir else reports_dir(pred_dir)
    stem = output_stem(Path(args.list).stem if args.list else args.domain, args)
    write_json(result, output_dir / f"{stem}.json")
    plot_sweep(result, output_dir / f"{stem}.png")
    print(f"wrote {output_dir / stem}.json and .png")
    return result


def output_stem(ids_name: str, args: argparse.Namespace) -> str:
    """``evaluation_<domain or list>_<mode>``, tagged when the protocol differs from the default."""
    stem = f"evaluation_{ids_name}_{args.mode}"
    if args.mode != "png" and args.crf_iteration > 0:
        stem += f"_crf={args.crf_iteration}"
    elif args.mode != "png" and args.post_process != "erode":
        stem += f"_post={args.post_process}"
    return stem


if __name__ == "__main__":
    run_main(main)

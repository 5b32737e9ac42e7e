"""Visual report of a recipe run: ``<experiments>/report/<recipe>.html`` with ``<recipe>.png`` beside it.

    python -m tools.report --recipe demo

The picture has, for ``NUM_EXAMPLES`` images of the scored list, a row of photo | ground truth |
CAM heat map of each present class | random walk | pseudo label | final prediction (single scale,
no CRF), in the dataset's palette with a legend; then the mIoU-vs-threshold curves of the scored
score maps (CAMs, random walk) and the training loss of every trained stage. The HTML adds the
stage table. It reads the artifacts of the recipe's stages named ``cams``, ``random_walk``,
``pseudo_labels`` and ``segmentation`` and skips a panel whose artifact does not exist yet.
``run_pipeline.py`` writes the report at the end of every run.
"""
from __future__ import annotations

import argparse
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from core.checkpoint import load_weights
from core.deeplab import DeepLab
from core.multiscale import multiscale_probabilities
from tools.artifacts.files import atomic_write_bytes, atomic_write_text, load_label_png
from tools.artifacts.predictions import load_prediction, score_maps
from tools.cli.arguments import StageArgumentParser
from tools.cli.exits import run_main
from tools.cli.model_args import load_model_config
from tools.data.descriptor import load_descriptor
from tools.data.readers import make_reader
from tools.data.transforms import normalize
from tools.pipeline import Settings, Stage, build_stages, load_recipe, recipe_path, table_rows
from tools.scoring.labels import threshold_argmax

NUM_EXAMPLES = 6
MAX_CAM_COLUMNS = 3
PANEL_INCHES = 1.9
SCORE_STAGES = ("cams", "random_walk")
DPI = 90


def _stage(stages: list[Stage], name: str) -> Stage | None:
    return next((stage for stage in stages if stage.name == name), None)


def _folder(stage: Stage | None, settings: Settings) -> Path | None:
    if stage is None or "folder" not in stage.output:
        return None
    folder = settings.paths.predictions(stage.output["folder"])
    return folder if folder.is_dir() else None


def _best_threshold(stage: Stage, settings: Settings) -> float | None:
    folder = _folder(stage, settings)
    path = None if folder is None else folder / f"evaluation_{stage.score['domain']}_{stage.score['mode']}.json"
    return json.loads(path.read_text())["best"]["threshold"] if path is not None and path.is_file() else None


def _final_model(stages: list[Stage], settings: Settings, num_classes: int) -> DeepLab | None:
    stage = _stage(stages, "segmentation")
    if stage is None or not settings.paths.model(stage.output["model"]).is_file():
        return None
    path = settings.paths.model(stage.output["model"])
    model = DeepLab(num_classes, **load_model_config(path, "deeplab", {}))
    load_weights(model, path)
    return model.eval()


def example_rows(stages: list[Stage], settings: Settings) -> tuple[list[str], list[list[tuple[str, Any]]]]:
    """Column titles and, per example image, ``(kind, array)`` panels (``image``, ``label``, ``heat``)."""
    descriptor = load_descriptor(settings.dataset)
    reader = make_reader(descriptor, settings.data_dir)
    cams_stage, rw_stage = _stage(stages, "cams"), _stage(stages, "random_walk")
    domain = cams_stage.score["domain"] if cams_stage and cams_stage.score else "train"
    ids = descriptor.read_ids(domain)[:NUM_EXAMPLES]
    cam_dir, rw_dir = _folder(cams_stage, settings), _folder(rw_stage, settings)
    label_dir = _folder(_stage(stages, "pseudo_labels"), settings)
    rw_threshold = _best_threshold(rw_stage, settings) if rw_dir is not None else None
    model = _final_model(stages, settings, descriptor.num_classes)
    titles = ["photo", "ground truth", *[f"CAM {index + 1}" for index in range(MAX_CAM_COLUMNS)],
              "random walk", "pseudo label", "final model"]
    rows = []
    for image_id in ids:
        image = reader.load_image(image_id)
        row: list[tuple[str, Any]] = [("image", np.asarray(image)), ("label", reader.load_mask(image_id))]
        size = (image.height, image.width)
        cams = (load_prediction(cam_dir / f"{image_id}.npz", descriptor.num_classes, image_size=size,
                                require=("hr_cam",)) if cam_dir is not None else None)
        for index in range(MAX_CAM_COLUMNS):
            if cams is not None and index < len(cams["hr_cam"]):
                name = descriptor.class_names[int(cams["keys"][index + 1])]
                row.append(("heat", (cams["hr_cam"][index], np.asarray(image), name)))
            else:
                row.append(("empty", None))
        if rw_dir is not None and rw_threshold is not None:
            path = rw_dir / f"{image_id}.npz"
            walk = score_maps(load_prediction(path, descriptor.num_classes, image_size=size), path)
            background = rw_threshold if walk.background is None else walk.background
            row.append(("label", walk.keys[threshold_argmax(walk.scores, background)]))
        else:
            row.append(("empty", None))
        label_path = None if label_dir is None else label_dir / f"{image_id}.png"
        row.append(("label", load_label_png(label_path)) if label_path is not None and label_path.is_file()
                   else ("empty", None))
        if model is not None:
            with torch.no_grad():
                probabilities = multiscale_probabilities(model, normalize(image), (1.0,), flip=False)
            row.append(("label", probabilities.argmax(0).numpy()))
        else:
            row.append(("empty", None))
        rows.append(row)
    return titles, rows


def _draw_panel(axis, kind: str, content: Any, palette: np.ndarray) -> None:
    axis.set_axis_off()
    if kind == "image":
        axis.imshow(content)
    elif kind == "label" and content is not None:
        axis.imshow(palette[np.asarray(content, dtype=np.uint8)])
    elif kind == "heat":
        heat, image, name = content
        axis.imshow(image)
        axis.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        axis.set_title(name, fontsize=7, pad=1)


def _threshold_curves(axis, stages: list[Stage], settings: Settings) -> None:
    for name in SCORE_STAGES:
        stage = _stage(stages, name)
        folder = _folder(stage, settings)
        path = None if folder is None else folder / f"evaluation_{stage.score['domain']}_{stage.score['mode']}.json"
        if path is None or not path.is_file():
            continue
        results = json.loads(path.read_text())["results"]
        axis.plot([entry["threshold"] for entry in results], [entry["miou"] for entry in results],
                  label=f"{stage.title} ({stage.score['domain']})")
    axis.set_xlabel("background threshold")
    axis.set_ylabel("mIoU (%)")
    axis.set_title("mIoU against the background threshold", fontsize=9)
    axis.legend(fontsize=7)


def _loss_curves(axis, stages: list[Stage], settings: Settings) -> None:
    for stage in stages:
        if "model" not in stage.output:
            continue
        log = settings.paths.json_log(stage.output["model"])
        if not log.is_file():
            continue
        train = json.loads(log.read_text()).get("train", [])
        if train:
            last = train[-1]["iteration"]
            axis.plot([entry["iteration"] / last for entry in train], [entry["loss"] for entry in train],
                      label=stage.title)
    axis.set_xlabel("fraction of training")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.set_title("training loss", fontsize=9)
    axis.legend(fontsize=7)


def render(stages: list[Stage], settings: Settings) -> bytes:
    """The report picture as PNG bytes."""
    descriptor = load_descriptor(settings.dataset)
    titles, rows = example_rows(stages, settings)
    columns = len(titles)
    figure = Figure(figsize=(columns * PANEL_INCHES, (len(rows) + 2.6) * PANEL_INCHES))
    grid = figure.add_gridspec(len(rows) + 2, columns, height_ratios=[1] * len(rows) + [0.3, 2.3])
    for index, row in enumerate(rows):
        for column, (kind, content) in enumerate(row):
            axis = figure.add_subplot(grid[index, column])
            _draw_panel(axis, kind, content, descriptor.palette)
            if index == 0:
                axis.text(0.5, 1.12, titles[column], transform=axis.transAxes, ha="center", fontsize=8)
    legend = figure.add_subplot(grid[len(rows), :])
    legend.set_axis_off()
    handles = [Patch(color=descriptor.palette[index] / 255, label=name)
               for index, name in enumerate(descriptor.class_names)]
    legend.legend(handles=handles, loc="center", ncol=len(handles), fontsize=8, frameon=False)
    half = columns // 2
    _threshold_curves(figure.add_subplot(grid[len(rows) + 1, :half]), stages, settings)
    _loss_curves(figure.add_subplot(grid[len(rows) + 1, half:]), stages, settings)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _text(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(recipe: str, settings: Settings) -> Path:
    """Write ``report/<recipe>.png`` and ``report/<recipe>.html``; returns the HTML path."""
    label = recipe_path(recipe).stem
    stages = build_stages(load_recipe(recipe), settings.data_dir)
    folder = settings.paths.root / "report"
    atomic_write_bytes(folder / f"{label}.png", render(stages, settings))
    cells = "".join(
        f"<tr><td>{html.escape(row['stage'])}</td><td>{row['list']}</td><td>{_text(row['miou'], '.2f')}</td>"
        f"<td>{_text(row['seconds'], 'd')}</td></tr>" for row in table_rows(label, stages, settings))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{label} report</title></head><body>"
            f"<h1>Recipe {html.escape(label)}</h1><table border='1' cellpadding='4'>"
            f"<tr><th>stage</th><th>scored on</th><th>mIoU (%)</th><th>time (s)</th></tr>{cells}</table>"
            f"<p><img src='{label}.png' alt='examples and curves'></p></body></html>\n")
    path = folder / f"{label}.html"
    atomic_write_text(path, page)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe name or .json file, as for run_pipeline.py")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--experiments_dir", default=None, help="default: the recipe's, else experiments/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe)
    settings = Settings.from_recipe(recipe, args.data_dir, args.experiments_dir)
    print(f"report: {write_report(args.recipe, settings)}")


if __name__ == "__main__":
    run_main(main)

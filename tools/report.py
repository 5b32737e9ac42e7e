"""Visual report of a recipe run: ``<experiments>/report/<recipe>.html`` with ``<recipe>.png`` beside it.

    python -m tools.report --recipe demo

The picture has, for ``NUM_EXAMPLES`` images of the CAMs' scored list, a row of photo | ground truth |
CAM heat map of each present class | random walk | pseudo label | final model, in the dataset's palette
with a legend; then ``NUM_FINAL_EXAMPLES`` rows of the final maps' own scored list (``val``) with photo,
ground truth and final model; then the mIoU-vs-threshold curves of the scored score maps (CAMs, random
walk) and the training loss of every trained stage. The final model column shows the maps that were
scored: the ``segmentation_maps`` stage's output folder (multi-scale, CRF: whatever its command made),
empty for an image that folder has no map of. The HTML adds the stage table, with a note on every stage
whose training loss went non-finite (the ``diverged`` entry of its JSON log, ``TrainingLogger``). It reads
the artifacts of the recipe's stages named ``cams``, ``random_walk``, ``pseudo_labels`` and
``segmentation_maps`` and skips a panel whose artifact does not exist yet. ``run_pipeline.py`` writes the
report at the end of every run.
"""
from __future__ import annotations

import argparse
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from tools.artifacts.files import atomic_write_bytes, atomic_write_text, load_label_png, read_json
from tools.artifacts.paths import CAM_SUFFIX, PNG_SUFFIX, evaluation_json
from tools.artifacts.predictions import load_prediction, score_maps
from tools.cli.arguments import StageArgumentParser
from tools.cli.exits import run_main
from tools.data.descriptor import load_descriptor
from tools.data.readers import make_reader
from tools.data.voc import VOCReader
from tools.pipeline import Settings, Stage, build_stages, load_recipe, recipe_path, table_rows
from tools.scoring.labels import threshold_argmax
from tools.training.logger import DIVERGED

NUM_EXAMPLES = 6
NUM_FINAL_EXAMPLES = 3  # rows of the final maps' own list, when it is not the CAMs'
FINAL_STAGE = "segmentation_maps"
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


def _evaluation(stage: Stage, settings: Settings) -> dict | None:
    """The stage's scored result (``evaluate.py``'s JSON in the folder's ``reports/``), None before scoring."""
    folder = _folder(stage, settings)
    if folder is None or not stage.score:
        return None
    path = evaluation_json(folder, stage.score["domain"], stage.score["mode"])
    return json.loads(path.read_text()) if path.is_file() else None


def _best_threshold(stage: Stage, settings: Settings) -> float | None:
    result = _evaluation(stage, settings)
    return None if result is None else result["best"]["threshold"]


def _label_panel(folder: Path | None, image_id: str) -> tuple[str, Any]:
    """The ``<id>.png`` label map of ``folder`` as a panel, empty when there is none."""
    path = None if folder is None else folder / f"{image_id}{PNG_SUFFIX}"
    return ("label", load_label_png(path)) if path is not None and path.is_file() else ("empty", None)


@dataclass(frozen=True)
class Sources:
    """The folders a row's panels come from (None: not made yet) and the walk's scored threshold."""

    cams: Path | None
    walk: Path | None
    walk_threshold: float | None
    pseudo_labels: Path | None
    final: Path | None


def _refinement_panels(reader: VOCReader, sources: Sources, image_id: str,
                       image: Image.Image) -> list[tuple[str, Any]]:
    """CAM heat maps (up to ``MAX_CAM_COLUMNS``), the walk thresholded as it was scored, the pseudo label."""
    num_classes, names = reader.descriptor.num_classes, reader.descriptor.class_names
    size = (image.height, image.width)
    cams = (load_prediction(sources.cams / f"{image_id}{CAM_SUFFIX}", num_classes, image_size=size,
                            require=("hr_cam",)) if sources.cams is not None else None)
    panels: list[tuple[str, Any]] = []
    for index in range(MAX_CAM_COLUMNS):
        if cams is not None and index < len(cams["hr_cam"]):
            panels.append(("heat", (cams["hr_cam"][index], np.asarray(image), names[int(cams["keys"][index + 1])])))
        else:
            panels.append(("empty", None))
    if sources.walk is not None and sources.walk_threshold is not None:
        path = sources.walk / f"{image_id}{CAM_SUFFIX}"
        walk = score_maps(load_prediction(path, num_classes, image_size=size), path)
        background = sources.walk_threshold if walk.background is None else walk.background
        panels.append(("label", walk.keys[threshold_argmax(walk.scores, background)]))
    else:
        panels.append(("empty", None))
    return [*panels, _label_panel(sources.pseudo_labels, image_id)]


def example_rows(stages: list[Stage], settings: Settings) -> tuple[list[str], list[list[tuple[str, Any]]]]:
    """Column titles and, per example image, ``(kind, content)`` panels (``image``, ``label``, ``heat``,
    ``empty``); the first panel's content is ``(photo, "<list>: <id>")``. The rows of the CAMs' scored list
    come first, then those of the final maps' scored list (photo, ground truth and final maps only)."""
    descriptor = load_descriptor(settings.dataset)
    reader = make_reader(descriptor, settings.data_dir)
    cams_stage, rw_stage, final_stage = (_stage(stages, name) for name in ("cams", "random_walk", FINAL_STAGE))
    domain = cams_stage.score["domain"] if cams_stage and cams_stage.score else "train"
    rw_dir = _folder(rw_stage, settings)
    sources = Sources(_folder(cams_stage, settings), rw_dir,
                      _best_threshold(rw_stage, settings) if rw_dir is not None else None,
                      _folder(_stage(stages, "pseudo_labels"), settings), _folder(final_stage, settings))
    examples = [(domain, image_id) for image_id in descriptor.read_ids(domain)[:NUM_EXAMPLES]]
    final_domain = (final_stage.score or final_stage.output).get("domain", domain) if final_stage else domain
    if sources.final is not None and final_domain != domain:
        examples += [(final_domain, image_id) for image_id in descriptor.read_ids(final_domain)[:NUM_FINAL_EXAMPLES]]
    titles = ["photo", "ground truth", *[f"CAM {index + 1}" for index in range(MAX_CAM_COLUMNS)],
              "random walk", "pseudo label", "final model (scored maps)"]
    rows = []
    for list_name, image_id in examples:
        image = reader.load_image(image_id)
        middle = (_refinement_panels(reader, sources, image_id, image) if list_name == domain  # none made for val
                  else [("empty", None)] * (MAX_CAM_COLUMNS + 2))
        rows.append([("image", (np.asarray(image), f"{list_name}: {image_id}")), ("label", reader.load_mask(image_id)),
                     *middle, _label_panel(sources.final, image_id)])
    return titles, rows


def _draw_panel(axis, kind: str, content: Any, palette: np.ndarray) -> None:
    axis.set_axis_off()
    if kind == "image":
        photo, caption = content
        axis.imshow(photo)
        axis.text(-0.08, 0.5, caption, transform=axis.transAxes, rotation=90, ha="right", va="center", fontsize=6)
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
        result = None if stage is None else _evaluation(stage, settings)
        if result is None:
            continue
        results = result["results"]
        axis.plot([entry["threshold"] for entry in results], [entry["miou"] for entry in results],
                  label=f"{stage.title} ({stage.score['domain']})")
    axis.set_xlabel("background threshold")
    axis.set_ylabel("mIoU (%)")
    axis.set_title("mIoU against the background threshold", fontsize=9)
    if axis.get_legend_handles_labels()[0]:  # a stage not run yet draws nothing
        axis.legend(fontsize=7)


def _training_log(stage: Stage, settings: Settings) -> dict[str, Any]:
    """The JSON training log of a training stage (``{}`` for another stage or before it ran)."""
    if "model" not in stage.output:
        return {}
    return read_json(settings.paths.json_log(stage.output["model"]), "training log") or {}


def divergence_note(stage: Stage, settings: Settings) -> str | None:
    """What the report says of a stage whose training loss went non-finite (None when it did not)."""
    diverged = _training_log(stage, settings).get(DIVERGED)
    if not diverged:
        return None
    return (f"training diverged: the loss was {diverged['loss']} at iteration {diverged['iteration']}; the run "
            "stopped unfinished, so this stage and those after it show an earlier run's artifacts or none")


def _loss_curves(axis, stages: list[Stage], settings: Settings) -> None:
    for stage in stages:
        log = _training_log(stage, settings)
        train = log.get("train", [])
        if train:
            last = train[-1]["iteration"]
            label = stage.title
            if log.get(DIVERGED):
                label += f" (diverged at iteration {log[DIVERGED]['iteration']}: loss {log[DIVERGED]['loss']})"
            axis.plot([entry["iteration"] / last for entry in train], [entry["loss"] for entry in train],
                      label=label)
    axis.set_xlabel("fraction of training")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.set_title("training loss", fontsize=9)
    if axis.get_legend_handles_labels()[0]:  # a stage not run yet draws nothing
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
    notes = [divergence_note(stage, settings) for stage in stages]
    cells = "".join(
        f"<tr><td>{html.escape(row['stage'])}</td><td>{row['list']}</td><td>{_text(row['miou'], '.2f')}</td>"
        f"<td>{_text(row['seconds'], 'd')}</td><td>{html.escape(note or '')}</td></tr>"
        for row, note in zip(table_rows(label, stages, settings), notes))
    final = _folder(_stage(stages, FINAL_STAGE), settings)
    shown = (f"the maps that were scored, {html.escape(str(final))}" if final is not None
             else "empty: the segmentation maps are not made yet")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{label} report</title></head><body>"
            f"<h1>Recipe {html.escape(label)}</h1><table border='1' cellpadding='4'>"
            f"<tr><th>stage</th><th>scored on</th><th>mIoU (%)</th><th>time (s)</th><th>note</th></tr>{cells}"
            f"</table><p>Final model column: {shown}.</p>"
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

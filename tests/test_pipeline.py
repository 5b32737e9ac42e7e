"""run_pipeline.py end to end on the smoke recipe: artifacts, skipping, reruns after a change, kills."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_runner import REPO, kill_when_files_appear, run_completed, run_script
from tools.artifacts.files import load_label_png
from tools.cli.presets import vit_flags
from tools.data.descriptor import load_descriptor
from tools.pipeline import RECIPES, Overrides, Settings, build_stages, load_recipe, plan, with_overrides
from tools.report import example_rows

STAGE_LINE = re.compile(r"^=== .* \((\w+)\): (.*)$", re.MULTILINE)
TABLE_ROW = re.compile(r"^(.+?)\s{2,}(train|val|-)\s+([\d.]+|-)\s+(\d+|-)$", re.MULTILINE)
NEXT = re.compile(r"^Next: (.+(?:\n {6}python .+)*)", re.MULTILINE)  # a command, and more indented under it
# Appended to a printed command: the smoke recipe's sizes of that script's stage where the printed command leaves
# the paper's (ImageNet weights, paper-size models, every scale), so that it takes seconds: the inference commands
# then find the recipe's folders done. Tags, inputs, lists and dataset flags stay as printed.
SMOKE_SIZES = {
    "train_semformer.py": ["--pretrained", "none", *vit_flags("tiny"), "--image_size", "64", "--min_image_size", "48",
                           "--max_image_size", "96", "--batch_size", "4", "--max_epoch", "1", "--num_workers", "0"],
    "inference_semformer.py": ["--scales", "1.0,0.5"],
    "train_affinitynet.py": ["--pretrained", "none", "--architecture", "resnet18", "--image_size", "96",
                             "--min_image_size", "64", "--max_image_size", "96", "--batch_size", "4", "--max_epoch",
                             "1", "--num_workers", "0"],
    "inference_rw.py": ["--exp_times", "2", "--image_size", "96"],
    "inference_segmentation.py": ["--scales", "1.0", "--crf", "none"],
}


def pipeline(data: Path, experiments: Path, *extra: str, recipe: str = "smoke") -> str:
    return run_script("run_pipeline.py", "--recipe", recipe, "--data_dir", str(data),
                      "--experiments_dir", str(experiments), *extra)


def decisions(output: str) -> dict[str, str]:
    return dict(STAGE_LINE.findall(output))


def scores(output: str) -> dict[str, str]:
    return {stage.strip(): miou for stage, _, miou, _ in TABLE_ROW.findall(output)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, str]:
    """One uninterrupted run of the smoke recipe: (data dir, experiments dir, its output)."""
    root = tmp_path_factory.mktemp("pipeline")
    output = pipeline(root / "data", root / "experiments")
    return root / "data", root / "experiments", output


def test_every_stage_writes_its_artifacts_and_a_rerun_skips_all(finished):
    data, experiments, output = finished
    recipe = json.loads((RECIPES / "smoke.json").read_text())
    assert set(decisions(output).values()) == {"new"}
    for stage in recipe["stages"]:
        if "model" in stage["output"]:
            record = json.loads((experiments / "models" / f"{stage['output']['model']}.json").read_text())
            assert record["finished"] and record["run"]["git"] is not None
        else:
            name = stage["output"]["folder"].format(**recipe["vars"])
            assert (experiments / "predictions" / name / "run.json").is_file()
        assert (experiments / "logs" / "pipeline@smoke" / f"{stage['name']}.log").is_file()
    page = (experiments / "report" / "smoke.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert images and all((experiments / "report" / image).stat().st_size > 10_000 for image in images)
    assert "DeepLab maps" in page and f"report: {experiments / 'report' / 'smoke.html'}" in output
    table = scores(output)
    assert set(table) == {stage["title"] for stage in recipe["stages"]} and table["DeepLab maps"] != "-"
    again = pipeline(data, experiments)
    assert set(decisions(again).values()) == {"done"} and scores(again) == table


def test_a_changed_setting_reruns_that_stage_and_the_later_ones_only(finished, tmp_path):
    data, experiments, output = finished
    recipe = json.loads((RECIPES / "smoke.json").read_text())
    for stage in recipe["stages"]:
        if stage["name"] == "pseudo_labels":
            stage["command"] += " --threshold 0.3"
    changed = tmp_path / "smoke.json"
    changed.write_text(json.dumps(recipe))
    rerun = decisions(pipeline(data, experiments, recipe=str(changed)))
    assert rerun["pseudo_labels"].startswith("changed: --threshold")
    assert rerun["segmentation"].startswith("changed: input labels") and rerun["segmentation_maps"].startswith("changed")
    assert {rerun[name] for name in ("caae", "semformer", "cams", "affinity_labels", "affinitynet",
                                     "random_walk")} == {"done"}
    back = decisions(pipeline(data, experiments))  # the original recipe: its settings differ again
    assert back["pseudo_labels"].startswith("changed") and back["cams"] == "done"


def test_an_override_is_part_of_the_command_the_provenance_check_sees(finished):
    data, experiments, _ = finished
    recipe = load_recipe("smoke")
    settings = Settings.from_recipe(recipe, str(data), str(experiments))
    overrides = Overrides.from_arguments(None, ["pseudo_labels=--threshold 0.3", "*=--num_workers 0"])
    stages = {stage.name: stage for stage in with_overrides(build_stages(recipe, settings.data_dir), overrides,
                                                             settings)}
    extra, reason = plan(stages["pseudo_labels"], settings)
    assert extra == ["--overwrite"] and reason.startswith("changed: --threshold 0.25 -> 0.3")
    assert plan(stages["cams"], settings) == (None, "done")  # --num_workers: how fast, not what; no change


def test_killed_mid_stage_then_rerun_gives_the_same_table(finished, tmp_path):
    data, _, output = finished
    experiments = tmp_path / "experiments"
    command = [sys.executable, "run_pipeline.py", "--recipe", "smoke", "--data_dir", str(data),
               "--experiments_dir", str(experiments)]
    cams = experiments / "predictions" / "SemFormer@smoke@train@scale=1.0,0.5"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    written = kill_when_files_appear(process, cams, count=2)
    train_ids = load_descriptor(data / "dataset.json").read_ids("train")
    assert process.returncode == -signal.SIGKILL and written < len(train_ids)
    resumed = pipeline(data, experiments)
    assert decisions(resumed)["cams"].endswith("files to make") and decisions(resumed)["caae"] == "done"
    assert scores(resumed) == scores(output)


def test_the_smoke_recipe_runs_on_a_dataset_in_cocos_layout(tmp_path):
    coco = tmp_path / "coco"
    run_script("-m", "tools.synthetic", "--format", "coco", "--out", str(coco), "--num_classes", "3",
               "--num_train", "24", "--num_val", "8", "--seed", "1", "--min_size", "64", "--max_size", "96")
    run_script("-m", "tools.prepare_coco", "--coco_dir", str(coco), "--out", str(coco), "--workers", "2")
    output = pipeline(coco, tmp_path / "experiments")  # the smoke recipe's dataset: {data_dir}/dataset.json
    table = scores(output)
    assert all(table[stage] != "-" for stage in ("SemFormer CAMs", "random walk", "pseudo labels", "DeepLab maps"))
    assert set(decisions(output).values()) == {"new"}


def printed_next_commands(log: str) -> list[list[str]]:
    """The commands of a stage log's ``Next:`` lines, split as a shell would, each once (a log holds every run
    of its stage)."""
    lines = dict.fromkeys(line.strip() for block in NEXT.findall(log) for line in block.splitlines())
    return [shlex.split(line) for line in lines]


def test_every_printed_next_command_runs_as_printed(finished, tmp_path):
    """Each stage's ``Next:`` commands, pasted as printed, on a VOC + SBD layout: the ``train_aug`` images beyond
    ``train`` and ``val`` have no ``SegmentationClass`` mask (their masks are the SBD ones)."""
    data, experiments, _ = finished
    descriptor = load_descriptor(data / "dataset.json")
    with_masks = set(descriptor.read_ids("train")) | set(descriptor.read_ids("val"))
    sbd_only = [image_id for image_id in descriptor.read_ids("train_aug") if image_id not in with_masks]
    masks, aside = data / descriptor.mask_dir, tmp_path / "sbd_only"
    aside.mkdir()
    for image_id in sbd_only:
        shutil.move(masks / f"{image_id}.png", aside)
    try:
        run = 0
        for stage in json.loads((RECIPES / "smoke.json").read_text())["stages"]:
            log = (experiments / "logs" / "pipeline@smoke" / f"{stage['name']}.log").read_text()
            commands = printed_next_commands(log)
            assert commands, f"stage {stage['name']} printed no Next: command"
            for command in commands:
                assert command[0] == "python" and command[1].endswith(".py"), command
                result = run_completed(*command[1:], *SMOKE_SIZES.get(command[1], []))
                assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout}\n{result.stderr}"
                run += 1
        assert run >= 10
    finally:
        for path in aside.iterdir():
            shutil.move(path, masks)


def test_the_reports_final_model_column_shows_the_scored_maps(finished):
    data, experiments, _ = finished
    recipe = load_recipe("smoke")
    settings = Settings.from_recipe(recipe, str(data), str(experiments))
    maps = experiments / "predictions" / "DeepLab@smoke@val@scale=1.0@crf=none"  # the segmentation_maps stage's
    titles, rows = example_rows(build_stages(recipe, str(data)), settings)
    assert titles[-1] == "final model (scored maps)"
    shown = {row[0][1][1]: row[-1] for row in rows}  # "<list>: <id>" -> the final model's panel
    val = [name for name in shown if name.startswith("val: ")]
    assert val and all(name.startswith(("train: ", "val: ")) for name in shown)
    for name, (kind, label) in shown.items():
        image_id = name.split(": ")[1]
        if name in val:
            assert kind == "label" and np.array_equal(label, load_label_png(maps / f"{image_id}.png"))
        else:  # the maps were made (and scored) on val only
            assert kind == "empty" and not (maps / f"{image_id}.png").exists()
    page = (experiments / "report" / "smoke.html").read_text()
    assert f"Final model column: the maps that were scored, {maps}" in page

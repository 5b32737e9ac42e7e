"""run_pipeline.py's overrides, its one path rule, and ``--preflight`` (every stage at full size on a few images)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_runner import REPO, run_script
from tools.artifacts.files import ArtifactError
from tools.cli import measurements
from tools.cli.arguments import UsageError
from tools.data.descriptor import load_descriptor
from tools.data.scratch import cut_lists, write_scratch_dataset
from tools.pipeline import (Overrides, Settings, build_stages, command, default_processes, load_recipe, parsed_args,
                            with_overrides)
from tools.scoring.parallel import parallel_map

STAGE_ROW = re.compile(r"^(\S[^\n]*?) {2,}(passed|failed|not run)\b([^\n]*)$", re.MULTILINE)
NUMBER = r"\d[\d.e+-]*"
PASSED_CELLS = re.compile(rf"^\s+{NUMBER} (s|min|h|d)\s+{NUMBER} m?s/(step|image)\s+{NUMBER} \w+ (RAM|GPU)\s+.*"
                          rf"{NUMBER} (s|min|h|d)\s+{NUMBER} \w+$")


def preflight(*flags: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "--preflight", *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})


def table(output: str) -> dict[str, tuple[str, str]]:
    """The preflight table's rows: title -> (result, the other cells)."""
    return {title.strip(): (result, rest) for title, result, rest in STAGE_ROW.findall(output)}


# ----------------------------------------------------------------------------- overrides and paths
def test_overrides_go_after_the_recipes_flags_to_the_stages_that_take_them():
    settings = Settings.from_recipe(load_recipe("voc"))
    overrides = Overrides.from_arguments("none", ["*=--num_workers 2", "caae=--batch_size 32 --num_workers 1"])
    stages = {stage.name: stage for stage in with_overrides(build_stages(load_recipe("voc"), settings.data_dir),
                                                             overrides, settings)}
    assert stages["caae"].overrides == ("--pretrained", "none", "--num_workers", "2", "--batch_size", "32",
                                        "--num_workers", "1")
    assert stages["cams"].overrides == ("--num_workers", "2")  # no --pretrained in inference_semformer.py
    assert stages["affinity_labels"].overrides == ()  # neither flag in make_affinity_labels.py
    assert stages["segmentation"].overrides[:2] == ("--pretrained", "none")
    caae = parsed_args(stages["caae"], settings)
    assert (caae.pretrained, caae.batch_size, caae.num_workers) == ("none", 32, 1)
    assert command(stages["caae"], settings, ["--resume", "auto"])[-4:] == ["--num_workers", "1", "--resume", "auto"]


@pytest.mark.parametrize("entries, message", [
    (["--batch_size 32"], "expected STAGE=FLAGS"),
    (["nosuch=--lr 1"], "no stage 'nosuch'; the recipe's stages are caae, semformer"),
    (["caae=--bogus 1"], "stage caae (train_caae): unrecognized arguments: --bogus 1"),
    (["*=--num_workers -1"], "stage caae (train_caae): argument --num_workers: must be >= 0, got -1"),
    (["*=2"], "'2' is not an option"),
])
def test_a_bad_override_is_one_line_naming_the_stage(entries, message):
    settings = Settings.from_recipe(load_recipe("voc"))
    with pytest.raises(UsageError, match=re.escape(message)):
        with_overrides(build_stages(load_recipe("voc"), settings.data_dir),
                       Overrides.from_arguments(None, entries), settings)


def test_recipe_paths_are_read_from_the_repository_and_command_line_paths_from_the_current_folder(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    voc = Settings.from_recipe(load_recipe("voc"))
    assert (voc.dataset, voc.data_dir) == (str(REPO / "data/voc12/dataset.json"), str(REPO.parent / "VOC2012"))
    assert voc.experiments_dir == str(REPO / "experiments")
    smoke = Settings.from_recipe(load_recipe("smoke"), data_dir="sets/smoke", experiments_dir="out")
    assert smoke.dataset == str(tmp_path / "sets/smoke/dataset.json")  # the recipe's {data_dir}/dataset.json
    assert smoke.experiments_dir == str(tmp_path / "out")
    given = Settings.from_recipe(load_recipe("voc"), data_dir="../data", dataset="my.json")
    assert (given.dataset, given.data_dir) == (str(tmp_path / "my.json"), str(tmp_path.parent / "data"))
    with pytest.raises(UsageError, match="--pretrained weights.pth: no such file"):
        Overrides.from_arguments("weights.pth", [])
    (tmp_path / "weights.pth").write_bytes(b"")
    assert Overrides.from_arguments("weights.pth", []).pretrained == str(tmp_path / "weights.pth")


def test_processes_are_the_flags_else_the_recipes_cpu_processes_on_a_machine_without_cuda(monkeypatch):
    demo = load_recipe("demo")
    stages = {stage.name: stage for stage in build_stages(demo, "data")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = Settings.from_recipe(demo)
    assert cpu.processes == 2
    assert command(stages["caae"], cpu)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command(stages["segmentation"], cpu)[1] == "train_segmentation.py"  # one 2-thread process (docs/demo.md)
    assert Settings.from_recipe(demo, processes=0).processes == 0
    assert Settings.from_recipe(load_recipe("voc")).processes == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings.from_recipe(demo).processes == 0  # one GPU, plain python
    assert Settings.from_recipe(demo, processes=4).processes == 4
    with pytest.raises(ArtifactError, match="'cpu_processes' must be a whole number >= 0, got -1"):
        default_processes({"cpu_processes": -1})


def test_a_dry_run_from_another_folder_prints_absolute_paths_and_the_overrides(tmp_path):
    output = run_script(str(REPO / "run_pipeline.py"), "--recipe", "voc", "--dry_run", "--data_dir", "voc",
                        "--dataset", "voc/dataset.json", "--pretrained", "none", "--stage_flags",
                        "semformer=--batch_size 4", cwd=tmp_path)
    commands = [line for line in output.splitlines() if line.startswith("python ")]
    assert len(commands) == 9 + 4  # the stages and their scoring passes
    flags = f"--dataset {tmp_path}/voc/dataset.json --data_dir {tmp_path}/voc --experiments_dir {REPO}/experiments"
    assert all(flags in line for line in commands)
    trained = [line for line in commands if "--pretrained none" in line]
    assert [line.split()[1] for line in trained] == ["train_caae.py", "train_semformer.py", "train_affinitynet.py",
                                                     "train_segmentation.py"]
    assert [line.split()[1] for line in commands if line.endswith("--batch_size 4")] == ["train_semformer.py"]


# ----------------------------------------------------------------------------- the pieces of the preflight
def test_cut_lists_keep_contained_lists_contained(synthetic_dataset, tmp_path):
    real = load_descriptor(synthetic_dataset)
    path = write_scratch_dataset(real, synthetic_dataset.parent, tmp_path / "scratch", 3)
    scratch = load_descriptor(path)
    assert scratch.data_dir == synthetic_dataset.parent.resolve() and set(scratch.lists) == set(real.lists)
    assert scratch.read_ids("val") == real.read_ids("val")[:3]
    assert set(scratch.read_ids("train")) <= set(scratch.read_ids("train_aug"))
    assert cut_lists({"all": list("abcdef"), "part": list("ef"), "other": list("xyz")}, 2) == {
        "part": ["e", "f"], "other": ["x", "y"], "all": ["a", "b", "e", "f"]}


@pytest.mark.parametrize("pool", [False, True])
def test_image_work_is_reported_per_image_after_the_first(tmp_path, monkeypatch, pool):
    monkeypatch.setenv(measurements.MEASUREMENTS_VARIABLE, str(tmp_path))
    monkeypatch.setattr(measurements, "_RECORD", measurements._Record())
    time.sleep(0.2)  # start-up: not image work
    if pool:  # two processes share the work: each 0.1 s image costs the stage 0.05 s
        assert list(parallel_map(time.sleep, [0.1] * 4, 2, "images")) == [None] * 4
    else:
        for _ in measurements.measured_images(range(4)):
            time.sleep(0.05)
    measurements.write_measurements()
    [reported] = measurements.read_measurements(tmp_path)
    assert reported["images"] == 4 and 0.05 <= reported["image_seconds"] < 0.08
    assert 0.15 <= reported["image_work_seconds"] < 0.24
    assert 0 < reported["peak_rss_bytes"] < 8 * 2**30


# ----------------------------------------------------------------------------- the preflight of the smoke recipe
@pytest.fixture(scope="module")
def smoke_preflight(synthetic_dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke recipe's preflight on 2 images per list, run from another folder with relative paths, projected
    onto lists twice as long (``--preflight_lists``: a descriptor whose ids need no photos)."""
    here = tmp_path_factory.mktemp("preflight")
    sizes = here / "sizes"
    sizes.mkdir()
    content = json.loads(synthetic_dataset.read_text())
    for name in content["lists"].values():
        ids = (synthetic_dataset.parent / name).read_text().split()
        (sizes / name).write_text("\n".join(ids + [f"{image_id}_copy" for image_id in ids]) + "\n")
    (sizes / "dataset.json").write_text(json.dumps(content))
    result = preflight("--recipe", "smoke", "--dataset", str(synthetic_dataset), "--data_dir",
                       str(synthetic_dataset.parent), "--preflight_lists", "sizes/dataset.json",
                       "--experiments_dir", "experiments", "--preflight_images", "2",
                       "--preflight_steps", "1", "--stage_flags", "*=--num_workers 0", "--stage_flags",
                       "segmentation=--seed 5", cwd=here)
    return here / "experiments", result


def test_the_smoke_preflight_passes_with_numbers_for_every_stage(smoke_preflight):
    experiments, result = smoke_preflight
    assert result.returncode == 0, result.stdout + result.stderr
    recipe = load_recipe("smoke")
    rows = table(result.stdout)
    scored = [f"{stage['title']}: scoring" for stage in recipe["stages"] if "score" in stage]
    assert set(rows) == {stage["title"] for stage in recipe["stages"]} | set(scored)
    for title, (outcome, cells) in rows.items():
        assert outcome == "passed" and PASSED_CELLS.match(cells), (title, cells)
    assert "s/step" in rows["CAAE training"][1] and "model" in rows["CAAE training"][1]
    assert "per image" in rows["SemFormer CAMs"][1]
    assert re.search(r"^total\s+.*\d (s|min|h|d)\s+[\d.]+ \w+$", result.stdout, re.MULTILINE)
    saved = json.loads((experiments / "logs" / "preflight@smoke.json").read_text())
    caae = next(row for row in saved["rows"] if row["name"] == "caae")
    assert (caae["full_units"], caae["epochs"], caae["evaluations"]) == (12, 1, 1)  # 2 x 24 train_aug ids, batch 4
    assert caae["projected_seconds"] == pytest.approx(caae["startup"] + 11 * caae["rate"] + caae["evaluation_seconds"]
                                                      + caae["save_seconds"])
    cams = next(row for row in saved["rows"] if row["title"] == "SemFormer CAMs")
    assert cams["full_units"] == 48 and cams["projected_bytes"] > 48 * cams["artifact_bytes"]


def test_the_preflight_runs_the_pipelines_commands_with_the_overrides_and_removes_its_scratch(smoke_preflight):
    experiments, result = smoke_preflight
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ python ")]
    caae = next(line for line in commands if "train_caae.py" in line)
    assert caae.endswith("--num_workers 0 --max_steps 2")  # the override, then the preflight's step cap
    assert "--tag CAAE@smoke" in caae and "--batch_size 4" in caae  # the recipe's own flags and sizes
    assert [line.split()[2] for line in commands if "--seed 5" in line] == ["train_segmentation.py"]
    assert not any("--num_workers" in line for line in commands if "make_affinity_labels.py" in line)
    assert sorted(path.name for path in experiments.iterdir()) == ["logs"]  # the scratch folder is gone
    assert (experiments / "logs" / "preflight@smoke" / "caae.log").is_file()


def test_a_failing_stage_stops_the_preflight_naming_it(synthetic_dataset, tmp_path):
    result = preflight("--recipe", "smoke", "--dataset", str(synthetic_dataset), "--data_dir",
                       str(synthetic_dataset.parent), "--experiments_dir", str(tmp_path), "--preflight_images", "2",
                       "--preflight_steps", "1", "--stage_flags", "semformer=--eval_domain nosuch")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: preflight: stage semformer (SemFormer training) failed: ")
    assert "no list file for domain 'nosuch'" in result.stderr
    rows = table(result.stdout)
    assert rows["CAAE training"][0] == "passed" and rows["SemFormer training"][0] == "failed"
    assert {outcome for title, (outcome, _) in rows.items()
            if title not in ("CAAE training", "SemFormer training")} == {"not run"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["logs"]


def test_a_ctrl_c_stops_the_preflight_and_removes_its_scratch(synthetic_dataset, tmp_path):
    flags = ["--recipe", "smoke", "--dataset", str(synthetic_dataset), "--data_dir", str(synthetic_dataset.parent),
             "--experiments_dir", str(tmp_path), "--preflight_images", "2", "--preflight_steps", "1"]
    process = subprocess.Popen([sys.executable, "run_pipeline.py", "--preflight", *flags], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
    log = tmp_path / "logs" / "preflight@smoke" / "caae.log"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if log.is_file() and "Started CAAE@smoke" in log.read_text(errors="replace"):
            process.send_signal(signal.SIGINT)  # what a Ctrl-C sends: the driver passes it on to the stage
            break
        time.sleep(0.05)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 130 and "preflight stopped" in errors and "Traceback" not in errors
    assert sorted(path.name for path in tmp_path.iterdir()) == ["logs"]  # the scratch folder is gone

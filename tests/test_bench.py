"""tools.bench: the tiny benchmark of every stage, its report files, the plan of rows and CUDA-only options."""
from __future__ import annotations

import ast
import json
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch

from tests.cli_runner import run_failing, run_script
from tools import bench
from tools.benchmark import stages
from tools.benchmark.measure import Job, fork_server
from tools.benchmark.stages import CONFIGS, Bench, Setup
from tools.cli.repository import REPOSITORY, stage_script
from tools.scoring.parallel import default_jobs

TINY_BENCH_TIMEOUT_S = 60  # the whole tiny run takes ~15 s on two cores
# One torch thread: the test checks the tool, and two threads on two cores that another job also uses wait
# for each other at every op (the tiny run then takes 40 s instead of 14 s).
ONE_THREAD = ("--threads", "1")
HEADER_FIELDS = ("command", "created", "cpu", "gpu", "versions", "torch_threads", "cpu_count", "usable_cpus",
                 "load_average_before", "load_average_after", "git", "wall_seconds", "notes", "rows")
VERSIONED_PACKAGES = ("torch", "torchvision", "timm", "numpy")
ROW_FIELDS = ("stage", "config", "device", "amp", "jobs", "batch", "size", "unit", "throughput",
              "seconds_per_call", "peak_memory_mib", "memory", "note")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without a GPU")


def read_report(folder) -> dict:
    return json.loads((folder / bench.JSON_NAME).read_text())


def test_tiny_config_times_every_stage_on_the_cpu(tmp_path):
    output = run_script("-m", "tools.bench", "--config", "tiny", *ONE_THREAD, "--out", str(tmp_path),
                        timeout=TINY_BENCH_TIMEOUT_S)
    report = read_report(tmp_path)
    assert all(name in report for name in HEADER_FIELDS)
    assert all(report["versions"][package] not in ("", "absent") for package in VERSIONED_PACKAGES)
    assert report["torch_threads"] == 1 and report["cpu_count"] >= 1 and len(report["load_average_before"]) == 3
    rows = report["rows"]
    assert all(name in row for row in rows for name in ROW_FIELDS)
    assert [row["stage"] for row in rows if row["stage"] != "evaluation"] == \
        [stage for stage in bench.STAGES if stage != "evaluation"]
    assert [row["jobs"] for row in rows if row["stage"] == "evaluation"] == list(dict.fromkeys((1, default_jobs())))
    assert {(row["config"], row["device"]) for row in rows} == {("tiny", "cpu")}
    assert all(row["note"] is None and row["throughput"] > 0 and row["peak_memory_mib"] is not None for row in rows)
    training = [row for row in rows if bench.STAGES[row["stage"]].training]
    assert all(row["unit"] == "images/s" and row["iterations_per_s"] > 0 for row in training)
    table = (tmp_path / bench.MARKDOWN_NAME).read_text()
    assert table.count("\n| ") == len(rows) + 1  # the column names and one line per row
    assert "| random_walk | tiny | cpu |" in table and "| random_walk | tiny | cpu |" in output


@NO_GPU
def test_cuda_device_without_a_gpu_is_a_usage_error(tmp_path):
    error = run_failing("-m", "tools.bench", "--config", "tiny", "--device", "cuda", "--out", str(tmp_path))
    assert "argument --device" in error and "no CUDA device" in error
    assert not (tmp_path / bench.JSON_NAME).exists()


@NO_GPU
def test_all_without_a_gpu_skips_the_paper_configs_with_a_note(tmp_path):
    run_script("-m", "tools.bench", "--all", "--stage", "random_walk", "pseudo_label", *ONE_THREAD,
               "--out", str(tmp_path), timeout=TINY_BENCH_TIMEOUT_S)
    report = read_report(tmp_path)
    assert [(row["stage"], row["config"]) for row in report["rows"]] == [("random_walk", "tiny"),
                                                                           ("pseudo_label", "tiny")]
    assert any("paper configs were skipped" in note for note in report["notes"])


def test_plan_of_the_old_single_stage_names_and_of_all():
    (job,) = bench.plan(bench.parse_args(["--config", "deeplab-tiny", "--steps", "2", "--batch_size", "3"]))
    assert (job.stage, job.config, job.device, job.amp, job.bench.steps, job.batch_size) == \
        ("deeplab", "tiny", "cpu", "off", 2, 3)
    paper = bench.plan(bench.parse_args(["--config", "paper", "--device", "cpu", "--stage", "cam", "random_walk"]))
    assert [(job.stage, job.amp, job.bench.size) for job in paper] == [("cam", "off", (375, 500)),
                                                                       ("random_walk", None, (94, 125))]
    everything = bench.plan(bench.parse_args(["--all"]))
    assert {job.config for job in everything} == ({"tiny", "paper"} if torch.cuda.is_available() else {"tiny"})
    assert all(job.device == "cpu" for job in everything if job.config == "tiny")


@pytest.mark.parametrize("flags", [["--all", "--config", "tiny"], ["--config", "caae-paper", "--stage", "cam"]])
def test_flags_that_do_not_fit_together_are_usage_errors(flags):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(flags)
    assert stop.value.code == 2


def test_a_failing_row_keeps_its_error_as_a_note():
    broken = Bench(1, 0, ("--architecture", "resnet18", "--image_size", "64", "--radius", "1"))  # PathIndex: >= 2
    job = Job("affinitynet", "tiny", broken, "cpu", "off", None, None, False, None, 1)
    row = bench.run_job(job, fork_server())
    assert row["throughput"] is None and row["note"].startswith("ValueError: PathIndex radius")


def test_rows_run_the_scripts_own_builders_steps_and_defaults(monkeypatch):
    """A training row is the script's ``build_model`` and ``make_train_step`` with its own defaults: a spy
    put in the loaded script sees every timed step, and the paper row's batch and crop are the script's."""
    script = stage_script("train_affinitynet")
    steps = []

    def spied_step(*args):
        step = script.make_train_step(*args)
        return lambda model, batch: steps.append(len(batch[0])) or step(model, batch)

    spy = SimpleNamespace(**{**vars(script), "make_train_step": spied_step})
    monkeypatch.setattr(stages, "stage_script", lambda name: spy if name == "train_affinitynet" else stage_script(name))
    with ExitStack() as cleanup:
        setup = Setup(torch.device("cpu"), "off", None, False, None, cleanup)
        prepared = stages.prepare_affinitynet(CONFIGS["affinitynet"]["tiny"], setup)
        prepared.run()
        paper_args = script.parse_args(["--tag", "x", "--label_name", "x"])
        assert steps == [prepared.batch] == [4]
        assert (paper_args.batch_size, paper_args.image_size) == (32, 512)  # what the paper row runs at


def test_the_benchmark_keeps_no_copy_of_a_paper_default():
    """The paper's numbers live in the scripts: CAM scales, label thresholds, the evaluation sweep, batch and
    crop sizes are nowhere in the benchmark's code (its random inputs have their own constants)."""
    copies = {0.5, 1.5, 0.11, 0.15, 0.25, 0.4, 448, 224, 321, 512, 64, 32}  # 2.0 == 2, a common number
    for path in (REPOSITORY / "tools" / "bench.py", REPOSITORY / "tools" / "benchmark" / "stages.py"):
        numbers = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
                   and not isinstance(node.value, bool)}
        assert not numbers & copies, (path.name, numbers & copies)

"""Faults of real machines and clusters: provenance that identifies what was used, one writer per artifact, no
diverged model marked finished, one command for every start (first start, torchrun restart, requeue)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import inference_semformer
import make_affinity_labels
import train_caae
import train_segmentation
from core.semformer import SemFormerSegmentor
from tests.cli_runner import REPO, run_script
from tests.test_engine import HELPER, TAG, _finish, _log, _run_helper, reference  # noqa: F401 (fixture)
from tests.test_faults import CAMS, TINY_VIT, cams, data, outcome  # noqa: F401 (fixtures)
from tests.test_provenance import _toy_trainer
from tools.artifacts.model_card import describe_model, read_card, write_card
from tools.artifacts.paths import ExperimentPaths
from tools.artifacts.provenance import read_run, run_record, stale_reasons
from tools.cli.exits import EXIT_ERROR, EXIT_USAGE
from tools.cli.presets import vit_kwargs
from tools.data.descriptor import load_descriptor
from tools.pipeline import Settings, build_stages, load_recipe, plan
from tools.report import write_report
from tools.training.config import checkpoint_interval
from tools.training.state import load_checkpoint

HOLDER = ("import sys, time; from pathlib import Path; from tools.artifacts.locks import exclusive_writer\n"
          "with exclusive_writer(Path(sys.argv[1]), 'test'):\n    print('held', flush=True); time.sleep(120)")


def hold_lock_elsewhere(path) -> subprocess.Popen:
    """A process that holds the writer lock of ``path`` until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "held"
    return process


# ----------------------------------------------------------------------------- 1. stale outputs
def _train_tiny_semformer(experiments, dataset, run_id: str) -> list[str]:
    """What a SemFormer training with the same flags writes as ``S`` (new weights, a new run), and the flags of
    its CAM inference."""
    num_classes = load_descriptor(dataset).num_classes
    config = {**vit_kwargs("tiny"), "image_size": 64, "class_dim": 8}
    model = ExperimentPaths(experiments).model("S")
    model.parent.mkdir(parents=True, exist_ok=True)
    segmentor = SemFormerSegmentor(num_classes, **config)
    torch.save({f"segmentor.{key}": value for key, value in segmentor.state_dict().items()}, model)
    card = describe_model("semformer", num_classes, config)
    write_card(model, {**card, "finished": True, "run": run_record("train_semformer.py", {"lr": 1}, run_id=run_id)})
    return ["--tag", "S", "--scales", "1.0", "--cra_layers", "1", "--dataset", str(dataset), "--experiments_dir",
            str(experiments), "--domain", "train", "--num_workers", "0"]


def test_a_retrained_model_makes_its_cam_folder_stale(capsys, data, tmp_path):
    experiments = tmp_path / "exp"
    inference_semformer.main(_train_tiny_semformer(experiments, data, "first"))
    flags = _train_tiny_semformer(experiments, data, "second")
    model = ExperimentPaths(experiments).model("S")
    code, message = outcome(capsys, inference_semformer.main, *flags)
    assert code == EXIT_ERROR and "made with other settings" in message and f"input model {model} changed" in message


def test_a_copied_or_moved_experiments_folder_checks_its_own_inputs(capsys, data, tmp_path):
    original = tmp_path / "exp"
    flags = _train_tiny_semformer(original, data, "first")
    run_script("inference_semformer.py", *flags)  # in a process of its own, which lets go of the folder's lock
    folder = ExperimentPaths(original).predictions("S@train@scale=1.0")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    copy_flags = [*flags[:-5], str(copy), *flags[-4:]]
    copied_folder = ExperimentPaths(copy).predictions(folder.name)
    assert stale_reasons(read_run(copied_folder), inference_semformer.parse_args(copy_flags)) == []
    _train_tiny_semformer(copy, data, "retrained in the copy")  # the original's model is unchanged
    reasons = stale_reasons(read_run(copied_folder), inference_semformer.parse_args(copy_flags))
    assert reasons == [f"input model {ExperimentPaths(copy).model('S')} was remade"]
    assert stale_reasons(read_run(folder), inference_semformer.parse_args(flags)) == []
    code, message = outcome(capsys, inference_semformer.main, *copy_flags)
    assert code == EXIT_ERROR and "made with other settings" in message

    moved = tmp_path / "moved"  # rsync'd to another mount: still its own inputs, nothing to redo
    original.rename(moved)
    moved_flags = [*flags[:-5], str(moved), *flags[-4:]]
    moved_folder = ExperimentPaths(moved).predictions(folder.name)
    assert stale_reasons(read_run(moved_folder), inference_semformer.parse_args(moved_flags)) == []
    made = {path.name: path.stat().st_mtime_ns for path in moved_folder.glob("*.npz")}
    run_script("inference_semformer.py", *moved_flags)
    assert made and {path.name: path.stat().st_mtime_ns for path in moved_folder.glob("*.npz")} == made


def test_a_model_trained_again_with_the_same_flags_is_a_new_input(tmp_path):
    paths = ExperimentPaths(tmp_path)
    _toy_trainer(tmp_path).fit()
    first = read_card(paths.model(TAG))["run"]
    _toy_trainer(tmp_path, overwrite=True).fit()
    second = read_card(paths.model(TAG))["run"]
    assert first["settings"] == second["settings"] and first["run_id"] != second["run_id"]
    assert first["provenance"] != second["provenance"]


def test_labels_of_another_dataset_are_not_reused(cams, capsys, data, tmp_path):
    flags, _ = cams
    command = ["--experiment_name", CAMS, "--crf_iteration", "1", "--n_jobs", "1", *flags]
    make_affinity_labels.main(command)
    moved = tmp_path / "other_copy"
    shutil.copytree(data.parent, moved)  # the same files under another root: another dataset for provenance
    code, message = outcome(capsys, make_affinity_labels.main, *command, "--data_dir", str(moved))
    assert code == EXIT_ERROR and f"dataset root {data.parent.resolve()} -> {moved.resolve()}" in message


def test_the_pipeline_reruns_a_model_stage_on_another_dataset(synthetic_dataset, tmp_path):
    recipe = load_recipe("smoke")
    here = Settings(data_dir=str(synthetic_dataset.parent), dataset=str(synthetic_dataset),
                    experiments_dir=str(tmp_path / "exp"))
    stage = build_stages(recipe, here.data_dir)[0]
    args = train_caae.parse_args([*stage.argv[1:], *here.common_flags()])
    model = here.paths.model(stage.output["model"])
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    write_card(model, {"kind": "caae", "finished": True,
                       "run": run_record("train_caae.py", args, with_list=True, run_id="r")})
    assert plan(stage, here) == (None, "done")
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_dataset.parent, moved)
    there = Settings(data_dir=str(moved), dataset=str(moved / "dataset.json"), experiments_dir=here.experiments_dir)
    extra, reason = plan(stage, there)
    assert extra == ["--overwrite"] and f"dataset root {synthetic_dataset.parent.resolve()} -> {moved}" in reason


# ----------------------------------------------------------------------------- 2. one writer
def test_a_second_writer_of_a_prediction_folder_stops_naming_the_first(cams, capsys, data, tmp_path):
    flags, _ = cams
    command = ["--experiment_name", CAMS, "--crf_iteration", "1", "--n_jobs", "1", *flags]
    folder = ExperimentPaths(tmp_path / "exp").predictions(f"{CAMS}@aff_fg=0.11_bg=0.15")
    holder = hold_lock_elsewhere(folder / ".lock")
    try:
        code, message = outcome(capsys, make_affinity_labels.main, *command, "--overwrite")
        assert code == EXIT_ERROR and "is being written by another run" in message
        assert f"pid {holder.pid}" in message and os.uname().nodename in message
    finally:
        holder.kill()  # a killed holder leaves nothing that blocks the next writer
        holder.wait()
    make_affinity_labels.main(command)


def test_a_second_training_run_on_a_tag_stops_naming_the_first(capsys, data, tmp_path):
    experiments = tmp_path / "exp"
    holder = hold_lock_elsewhere(ExperimentPaths(experiments).model_lock("C"))
    try:
        code, message = outcome(capsys, train_caae.main, "--tag", "C", *TINY_VIT, "--image_size", "64",
                                "--decoder_width", "32", "--decoder_depth", "1", "--decoder_heads", "2",
                                "--class_dim", "16", "--num_workers", "0", "--dataset", str(data), "--experiments_dir",
                                str(experiments))
    finally:
        holder.kill()
        holder.wait()
    assert code == EXIT_ERROR and f"model C is being written by another run (host {os.uname().nodename}, " \
                                  f"pid {holder.pid}" in message


# ----------------------------------------------------------------------------- 3. divergence
def test_a_diverging_training_stops_with_one_line_and_is_not_finished(capsys, data, tmp_path):
    experiments = tmp_path / "exp"
    code, message = outcome(capsys, train_segmentation.main, "--tag", "D", "--label_dir",
                            str(data.parent / "SegmentationClassAug"), "--architecture", "deeplabv3plus",
                            "--backbone", "resnet18", "--pretrained", "none", "--crop_size", "32", "--batch_size", "2",
                            "--max_iters", "8", "--lr", "1e30", "--num_workers", "0", "--dataset", str(data),
                            "--experiments_dir", str(experiments))
    assert code == EXIT_ERROR and message.startswith("error: training of D diverged: the loss is ")
    assert "the model is not marked finished" in message
    card = read_card(ExperimentPaths(experiments).model("D"))
    assert card is None or card["finished"] is False
    iteration = int(message.split(" at iteration ")[1].split(";")[0])
    diverged = json.loads(ExperimentPaths(experiments).json_log("D").read_text())["diverged"]
    assert diverged["iteration"] == iteration and not math.isfinite(float(diverged["loss"]))

    recipe = tmp_path / "one_stage.json"  # the report of a recipe whose training stage diverged says so
    recipe.write_text(json.dumps({"dataset": str(data), "data_dir": str(data.parent), "stages": [
        {"name": "segmentation", "title": "DeepLab training", "command": "train_segmentation.py --tag D",
         "output": {"model": "D"}}]}))
    page = write_report(str(recipe), Settings(str(data.parent), str(data), str(experiments))).read_text()
    assert (f"training diverged: the loss was {diverged['loss']} at iteration {iteration}; the run stopped "
            "unfinished") in page


def test_frozen_batchnorm_from_random_init_trains_batchnorm_or_is_refused(capsys):
    args = train_segmentation.parse_args(["--tag", "D", "--label_dir", "x", "--pretrained", "none"])
    assert args.backbone_bn == "train"
    assert train_segmentation.parse_args(["--tag", "D", "--label_dir", "x"]).backbone_bn == "frozen"
    code, message = outcome(capsys, train_segmentation.main, "--tag", "D", "--label_dir", "x", "--pretrained", "none",
                            "--backbone_bn", "frozen")
    assert code == EXIT_USAGE and "--backbone_bn frozen keeps the BatchNorm statistics of a random init" in message


# ----------------------------------------------------------------------------- 4. one command for every start
def test_resume_auto_starts_continues_and_refuses_a_finished_model(tmp_path, reference):  # noqa: F811
    root = tmp_path / "auto"
    process = _run_helper(["--experiments_dir", str(root), "--step_delay", "0.2", "--resume", "auto"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in process.stdout:
        if "iteration=10," in line:
            process.send_signal(signal.SIGTERM)
            break
    _finish(process)
    output = _finish(_run_helper(["--experiments_dir", str(root), "--resume", "auto"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT))
    assert "Resumed toy at iteration" in output
    assert _log(root) == _log(reference)
    finished = tmp_path / "finished"  # a run with a model card, as every stage script's
    _toy_trainer(finished, resume="auto").fit()
    with pytest.raises(ValueError, match="already holds a trained model"):
        _toy_trainer(finished, resume="auto")


def test_a_torchrun_restart_continues_the_checkpoint_with_the_first_command(tmp_path, reference):  # noqa: F811
    root = tmp_path / "restart"
    process = _run_helper(["--experiments_dir", str(root), "--step_delay", "0.2", "--checkpoint_every", "3"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in process.stdout:
        if "iteration=10," in line:
            time.sleep(0.5)
            process.kill()  # a worker lost: no signal handler, no last checkpoint
            break
    process.wait()
    checkpoint = load_checkpoint(ExperimentPaths(root).checkpoint(TAG))
    assert checkpoint["step_in_epoch"] % 3 == 0 and checkpoint["step_in_epoch"] > 0  # mid-epoch, 3 after the last
    stale = ExperimentPaths(root).checkpoint(TAG).parent / f".{TAG}.last.pth.killed.tmp"
    stale.write_bytes(b"half a checkpoint")
    output = _finish(subprocess.Popen([sys.executable, str(HELPER), "--experiments_dir", str(root)], cwd=REPO,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                           "TORCHELASTIC_RESTART_COUNT": "1"}))
    assert f"Resumed toy at iteration {checkpoint['global_step']}" in output
    assert not stale.exists()
    assert _log(root) == _log(reference)


def test_a_run_that_died_before_its_first_checkpoint_starts_again_with_resume_auto(tmp_path):
    paths = ExperimentPaths(tmp_path)
    _toy_trainer(tmp_path).fit()
    card = read_card(paths.model(TAG))
    write_card(paths.model(TAG), {**card, "finished": False})
    paths.checkpoint(TAG).unlink()
    with pytest.raises(ValueError, match="stopped before its first checkpoint; start again with --resume auto"):
        _toy_trainer(tmp_path)
    _toy_trainer(tmp_path, resume="auto").fit()
    assert read_card(paths.model(TAG))["finished"] is True


def test_checkpoint_every_takes_iterations_or_minutes():
    assert checkpoint_interval("500") == (500, None) and checkpoint_interval("2.5m") == (None, 150.0)
    for bad in ("0", "-3m", "ten", "5s"):
        with pytest.raises(Exception, match="expected N|must be positive"):
            checkpoint_interval(bad)


def test_the_pipeline_keeps_a_workers_usage_status_through_torchrun(synthetic_dataset, tmp_path):
    """torchrun ends with 1 whatever its worker's status; the driver reads the worker's own (2 here)."""
    recipe = {"dataset": "{data_dir}/dataset.json", "data_dir": str(synthetic_dataset.parent), "stages": [
        {"name": "maps", "title": "DeepLab maps", "distributed": True,
         "command": "inference_segmentation.py --domain val --tag D --submission --end 0.5",
         "output": {"folder": "D@val", "suffix": ".png", "domain": "val"}}]}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    result = subprocess.run([sys.executable, "run_pipeline.py", "--recipe", str(path), "--gpus", "1",
                             "--experiments_dir", str(tmp_path / "exp")], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "stage command failed (2)" in result.stderr and "torch.distributed.run" in result.stderr
    log = (tmp_path / "exp" / "logs" / "pipeline@recipe" / "maps.log").read_text()
    assert "error: --submission packs the whole list" in log

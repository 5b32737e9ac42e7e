"""Provenance: run.json of prediction folders, model records, refusing stale or unknown artifacts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.semformer import SemFormerSegmentor
from tests.cli_runner import run_failing, run_script
from tests.engine_toy_train import ToyDataset, ToyNet, toy_step
from tests.test_engine import SINGLE_CPU
from tools.artifacts.files import ArtifactError, save_png
from tools.artifacts.model_card import describe_model, write_card
from tools.artifacts.paths import ExperimentPaths
from tools.artifacts.provenance import (RUN_FILE, claim_output_folder, folder_input, model_input, read_run, run_record,
                                        stale_reasons)
from tools.cli.model_args import load_model_config
from tools.data.descriptor import load_descriptor
from tools.data.voc import VOCReader
from tools.training.config import TrainConfig
from tools.training.engine import Trainer
from tools.training.optimizer import build_optimizer, parameter_groups

TAG = "toy"
TINY_SEGMENTOR = dict(backbone_name="deit_small_patch16_224", image_size=64,
                      backbone_kwargs=dict(depth=2, embed_dim=32, num_heads=2), class_dim=8, seg_dropout="token")


# ----------------------------------------------------------------------------- records
def test_provenance_ignores_execution_flags_but_not_settings():
    base = {"tag": "A", "scales": (1.0, 0.5), "with_cra": True, "domain": "train", "n_jobs": 2, "overwrite": False}
    same = run_record("inference_semformer.py", {**base, "domain": "train_aug", "n_jobs": 8, "overwrite": True})
    record = run_record("inference_semformer.py", base)
    assert record["provenance"] == same["provenance"]
    assert record["settings"] == {"scales": [1.0, 0.5], "tag": "A", "with_cra": True}
    assert record["execution"]["domain"] == "train"
    assert run_record("inference_semformer.py", {**base, "with_cra": False})["provenance"] != record["provenance"]
    assert run_record("inference_rw.py", base)["provenance"] != record["provenance"]
    changed_input = run_record("inference_semformer.py", base, {"model": {"path": "m.pth", "provenance": "x"}})
    assert changed_input["provenance"] != record["provenance"]
    assert record["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(record["git"]) == {"commit", "dirty"} and len(record["git"]["commit"]) == 40


def test_claim_reuses_a_matching_folder_and_refuses_another_one(tmp_path):
    folder = tmp_path / "CAM"
    record = run_record("inference_semformer.py", {"tag": "A", "with_cra": True})
    claim_output_folder(folder, record, ".npz", overwrite=False)
    (folder / "a.npz").write_bytes(b"done")
    claim_output_folder(folder, run_record("inference_semformer.py", {"tag": "A", "with_cra": True, "n_jobs": 3}),
                        ".npz", overwrite=False)
    assert (folder / "a.npz").read_bytes() == b"done"  # same settings: finished files stay

    other = run_record("inference_semformer.py", {"tag": "A", "with_cra": False})
    with pytest.raises(ArtifactError) as error:
        claim_output_folder(folder, other, ".npz", overwrite=False)
    message = str(error.value)
    assert "\n" not in message and "--with_cra True -> False" in message
    assert "--overwrite" in message and "another --tag" in message
    assert (folder / "a.npz").exists() and read_run(folder)["provenance"] == record["provenance"]

    claim_output_folder(folder, other, ".npz", overwrite=True)
    assert not (folder / "a.npz").exists() and read_run(folder)["provenance"] == other["provenance"]


def test_a_flag_added_since_at_its_off_value_is_no_change_but_set_it_is():
    recorded = run_record("train_caae.py", {"tag": "A", "lr": 0.1})  # made before --max_steps existed
    now = {"tag": "A", "lr": 0.1, "max_steps": None}
    assert stale_reasons(recorded, now) == []
    assert stale_reasons(recorded, {**now, "max_steps": 4}) == ["--max_steps <unset> -> 4"]
    assert stale_reasons(recorded, {**now, "lr": 0.2}) == ["--lr 0.1 -> 0.2"]


def test_files_without_run_json_are_refused_as_output_and_as_input(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"old")
    with pytest.raises(ArtifactError, match="holds 1 files but no run.json"):
        claim_output_folder(folder, run_record("make_pseudo_labels.py", {}), ".png", overwrite=False)
    with pytest.raises(ArtifactError, match="no run.json .*\n  python make_pseudo_labels.py --domain train --overwrite"):
        folder_input(folder, "python make_pseudo_labels.py --domain train")
    assert folder_input(folder, "...", allow_unknown=True) == {"path": str(folder), "provenance": None}


# ----------------------------------------------------------------------------- models
def _toy_trainer(root, **overrides) -> Trainer:
    config = TrainConfig(**{"tag": TAG, "max_epoch": 1, "batch_size": 8, "lr": 0.1, "weight_decay": 1e-4,
                            "select_by": "last", "experiments_dir": str(root), **overrides})
    model = ToyNet()
    optimizer = build_optimizer(parameter_groups(model, 0.1, 1e-4), 0.1, 1e-4)
    return Trainer(config, SINGLE_CPU, model, optimizer, ToyDataset(16), toy_step, script_args={"lr": 0.1},
                   model_config=describe_model("toy", 2, {"width": 4}),
                   inputs={"labels": {"path": "labels", "provenance": "abc"}})


def test_model_record_comes_with_the_weights_and_a_finished_tag_is_kept(tmp_path):
    paths = ExperimentPaths(tmp_path)
    trainer = _toy_trainer(tmp_path)
    assert not paths.model_card(TAG).exists()  # nothing is written before a model exists
    trainer.fit()
    record = json.loads(paths.model_card(TAG).read_text())
    assert (record["kind"], record["num_classes"], record["width"]) == ("toy", 2, 4)
    assert record["run"]["inputs"]["labels"]["provenance"] == "abc" and record["finished"] is True
    assert model_input(paths.model(TAG))["provenance"] == record["run"]["provenance"]
    assert load_model_config(paths.model(TAG), "toy", {}) == {"width": 4}
    weights = paths.model(TAG).read_bytes()

    with pytest.raises(ArtifactError) as error:
        _toy_trainer(tmp_path)
    message = str(error.value)
    assert "\n" not in message and all(flag in message for flag in ("--resume", "--overwrite", "another --tag"))
    assert paths.model(TAG).read_bytes() == weights

    _toy_trainer(tmp_path, overwrite=True).fit()
    with pytest.raises(ValueError, match="give one"):
        _toy_trainer(tmp_path, overwrite=True, resume=True)


# ----------------------------------------------------------------------------- through the scripts
@pytest.fixture()
def semformer_root(synthetic_dataset, tmp_path):
    descriptor = load_descriptor(synthetic_dataset)
    torch.manual_seed(0)
    segmentor = SemFormerSegmentor(descriptor.num_classes, **TINY_SEGMENTOR)
    model_path = tmp_path / "models" / "SemFormer@tiny.pth"
    model_path.parent.mkdir()
    torch.save({f"segmentor.{key}": value for key, value in segmentor.state_dict().items()}, model_path)
    write_card(model_path, describe_model("semformer", descriptor.num_classes, TINY_SEGMENTOR))
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path), "--domain", "train"]
    return tmp_path, flags, descriptor


def test_a_changed_flag_never_reuses_the_folder_and_the_chain_records_inputs(semformer_root):
    root, flags, descriptor = semformer_root
    command = ["inference_semformer.py", "--tag", "SemFormer@tiny", "--scales", "1.0", "--cra_layers", "2", *flags]
    run_script(*command)
    cam_dir = root / "predictions" / "SemFormer@tiny@train@scale=1.0"
    cams = read_run(cam_dir)
    assert cams["settings"]["with_cra"] is True and cams["script"] == "inference_semformer.py"
    assert "already exist" in run_script(*command)  # same settings: skipped

    error = run_failing(*command, "--with_cra", "False")
    assert "--with_cra True -> False" in error and "--overwrite" in error
    run_script(*command, "--with_cra", "False", "--overwrite")
    assert read_run(cam_dir)["settings"]["with_cra"] is False

    run_script("make_affinity_labels.py", "--experiment_name", cam_dir.name, "--n_jobs", "1", *flags)
    labels = read_run(root / "predictions" / f"{cam_dir.name}@aff_fg=0.11_bg=0.15")
    assert labels["inputs"]["cams"]["provenance"] == read_run(cam_dir)["provenance"]

    (cam_dir / RUN_FILE).unlink()
    error = run_failing("make_affinity_labels.py", "--experiment_name", cam_dir.name, "--n_jobs", "1", *flags)
    assert f"{cam_dir}: no run.json" in error and "python inference_semformer.py" in error


def test_training_on_a_finished_tag_stops(synthetic_dataset, tmp_path):
    descriptor = load_descriptor(synthetic_dataset)
    label_dir = tmp_path / "gt"
    reader = VOCReader(descriptor)
    for image_id in descriptor.read_ids("train"):
        save_png(label_dir / f"{image_id}.png", reader.load_mask(image_id, required=True).astype(np.uint8))
    command = ["train_segmentation.py", "--tag", "D", "--label_dir", str(label_dir), "--domain", "train",
               "--backbone", "resnet18", "--pretrained", "none", "--backbone_bn", "train", "--crop_size", "64",
               "--batch_size", "2", "--max_iters", "2", "--num_workers", "0", "--eval_domain", "none",
               "--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path)]
    run_script(*command)
    record = json.loads((tmp_path / "models" / "D.json").read_text())
    assert record["run"]["inputs"]["labels"] == {"path": str(label_dir), "provenance": None}
    error = run_failing(*command)
    assert "tag D already holds a trained model" in error and "--resume" in error
    run_script(*command, "--overwrite")

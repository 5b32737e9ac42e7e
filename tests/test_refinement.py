"""Refinement as a plug-in (CAM + dense CRF through the refined-map contract) and input folders anywhere
(a path for the name flag, ``--external`` for a folder without ``run.json``, recorded by its fingerprint)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import evaluate
import inference_rw
import make_affinity_labels
import make_pseudo_labels
import refine_crf
import train_affinitynet
import train_segmentation
from tools import baseline_cams
from tools.artifacts.files import ArtifactError, load_label_png
from tools.artifacts.fingerprint import folder_fingerprint
from tools.artifacts.model_card import read_card
from tools.artifacts.predictions import load_prediction, save_cams, score_maps
from tools.artifacts.provenance import EXTERNAL_SUFFIXES, read_run, stale_reasons
from tools.data.descriptor import load_descriptor
from tools.data.voc import VOCReader
from tools.scoring.refinement import background_score, cam_probabilities

CAMS = "Baseline@centre"
OUTSIDE = "MyCAMs"  # a hand-written CAM folder in our layout, outside experiments/
READ_CLASSES = 256
MIN_GAIN = 3.0  # mIoU points the CRF must add to the centre-Gaussian CAMs (measured: 25.2 -> 32.0)


@pytest.fixture
def cams(synthetic_dataset, tmp_path) -> tuple[list[str], Path]:
    """Baseline centre-Gaussian CAMs of the ``train`` list (with run.json): the dataset flags and the folder."""
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path / "exp"), "--domain", "train",
             "--n_jobs", "1"]
    folder = baseline_cams.main([*flags[:-2], "--experiment_name", CAMS])
    return flags, folder


@pytest.fixture
def outside(cams, tmp_path) -> Path:
    """The baseline CAMs copied to a folder elsewhere without run.json, as another codebase would leave them."""
    folder = tmp_path / "elsewhere" / OUTSIDE
    folder.mkdir(parents=True)
    for path in cams[1].glob("*.npz"):
        shutil.copy(path, folder / path.name)
    return folder


def test_background_score_and_probabilities():
    hr_cam = np.array([[[1.0, 0.5, 0.0]], [[0.0, 0.25, 0.0]]], np.float32)  # (2, 1, 3)
    assert background_score(hr_cam, 4).tolist() == [[0.0, 0.0625, 1.0]]
    probabilities = cam_probabilities(hr_cam, 4)
    assert probabilities.shape == (3, 1, 3) and np.allclose(probabilities.sum(axis=0), 1)
    assert probabilities[:, 0, 2].argmax() == 0 and probabilities[:, 0, 0].argmax() == 1


def test_crf_refinement_writes_the_refined_contract_and_beats_the_cams(synthetic_dataset, cams, capsys):
    flags, cam_dir = cams
    folder = refine_crf.main([*flags, "--experiment_name", CAMS])
    assert folder.name == f"{CAMS}@crf_refine=bg4_t10"
    descriptor = load_descriptor(synthetic_dataset)
    ids = descriptor.read_ids("train")
    reader = VOCReader(descriptor)
    for image_id in ids:
        size = reader.image_size(image_id)
        path = folder / f"{image_id}.npz"
        maps = score_maps(load_prediction(path, descriptor.num_classes, image_size=size), path)
        raw = load_prediction(cam_dir / f"{image_id}.npz", descriptor.num_classes)
        assert maps.keys.tolist() == raw["keys"].tolist() and maps.background is not None
        assert maps.scores.shape == raw["hr_cam"].shape and maps.background.shape == size
        assert np.allclose(maps.scores.sum(axis=0) + maps.background, 1, atol=1e-3)  # the CRF's marginals

    raw_miou = evaluate.main([*flags, "--experiment_name", CAMS])["best"]["miou"]
    refined_miou = evaluate.main([*flags, "--experiment_name", folder.name])["best"]["miou"]
    make_pseudo_labels.main([*flags, "--experiment_name", folder.name])
    labels = folder.parent / f"{folder.name}@crf=1"
    label_miou = evaluate.main([*flags, "--experiment_name", labels.name, "--mode", "png"])["best"]["miou"]
    for image_id in ids:
        keys = load_prediction(folder / f"{image_id}.npz", descriptor.num_classes)["keys"]
        assert set(np.unique(load_label_png(labels / f"{image_id}.png")).tolist()) <= set(keys.tolist())
    with capsys.disabled():
        print(f"\nmIoU on train: CAMs {raw_miou:.2f}, CAM + CRF {refined_miou:.2f}, its pseudo labels {label_miou:.2f}")
    assert refined_miou > raw_miou + MIN_GAIN


def test_a_folder_without_run_json_needs_external(outside, cams):
    flags, _ = cams
    for script in (make_affinity_labels, make_pseudo_labels, refine_crf):
        with pytest.raises(ArtifactError, match=f"{OUTSIDE}: no run.json .*pass --external"):
            script.main([*flags, "--experiment_name", str(outside)])
    make_affinity_labels.main([*flags, "--experiment_name", str(outside), "--external"])
    make_pseudo_labels.main([*flags, "--experiment_name", str(outside), "--external"])
    experiments = Path(flags[flags.index("--experiments_dir") + 1]) / "predictions"
    for name in (f"{OUTSIDE}@aff_fg=0.11_bg=0.15", f"{OUTSIDE}@crf=1"):
        assert len(list((experiments / name).glob("*.png"))) == len(list(outside.glob("*.npz"))), name
        recorded = next(iter(read_run(experiments / name)["inputs"].values()))
        assert recorded == {"path": str(outside), "provenance": folder_fingerprint(outside, EXTERNAL_SUFFIXES),
                            "external": True}


def test_a_changed_external_file_makes_the_stage_built_on_it_stale(synthetic_dataset, outside, cams):
    flags, _ = cams
    argv = [*flags, "--experiment_name", str(outside), "--external"]
    make_pseudo_labels.main(argv)
    output = Path(flags[flags.index("--experiments_dir") + 1]) / "predictions" / f"{OUTSIDE}@crf=1"
    assert stale_reasons(read_run(output), make_pseudo_labels.parse_args(argv)) == []
    make_pseudo_labels.main(argv)  # unchanged: reused

    first = sorted(outside.glob("*.npz"))[0]
    content = load_prediction(first, READ_CLASSES)
    save_cams(first, content["keys"], content["cam"] * 0.5, content["hr_cam"] * 0.5)
    reasons = stale_reasons(read_run(output), make_pseudo_labels.parse_args(argv))
    assert reasons == [f"input scores {outside} changed (its files' fingerprint)"]
    with pytest.raises(ArtifactError, match=r"made with other settings \(input scores .*MyCAMs changed\); "
                                            "pass --overwrite"):
        make_pseudo_labels.main(argv)
    make_pseudo_labels.main([*argv, "--overwrite"])
    assert stale_reasons(read_run(output), make_pseudo_labels.parse_args(argv)) == []


def test_an_external_cam_folder_goes_through_the_walk_to_a_deeplab(synthetic_dataset, outside, tmp_path):
    """A hand-written CAM folder (``--external``, by path) through affinity labels, AffinityNet, the random
    walk, pseudo labels and DeepLab training: the whole refinement and final stage of the pipeline."""
    experiments = tmp_path / "exp"
    data = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(experiments), "--domain", "train_aug"]
    outside_all = outside.parent / "all"  # the baseline CAMs of every train_aug id, without run.json
    folder = baseline_cams.main([*data, "--experiment_name", "AllCAMs"])
    shutil.copytree(folder, outside_all, ignore=shutil.ignore_patterns("run.json", ".lock"))
    make_affinity_labels.main(["--experiment_name", str(outside_all), "--external", "--crf_iteration", "1",
                               "--n_jobs", "1", *data])
    train_affinitynet.main(["--tag", "Aff", "--label_name", "all@aff_fg=0.11_bg=0.15", "--architecture", "resnet18",
                            "--pretrained", "none", "--image_size", "96", "--min_image_size", "64",
                            "--max_image_size", "96", "--batch_size", "4", "--max_epoch", "1", "--num_workers", "0",
                            *data])
    inference_rw.main(["--model_name", "Aff", "--cam_dir", str(outside_all), "--external", "--exp_times", "2",
                       "--image_size", "96", *data])
    walk = "Aff@train@beta=10@exp_times=2@rw"
    assert read_run(experiments / "predictions" / walk)["inputs"]["cams"]["external"] is True
    make_pseudo_labels.main(["--experiment_name", walk, "--crf_iteration", "1", "--n_jobs", "1", *data])
    train_segmentation.main(["--tag", "DL", "--label_name", f"{walk}@crf=1", "--architecture", "deeplabv3plus",
                             "--backbone", "resnet18", "--pretrained", "none", "--crop_size", "48", "--batch_size",
                             "4", "--max_iters", "2", "--num_workers", "0", *data])
    assert read_card(experiments / "models" / "DL.pth")["finished"] is True

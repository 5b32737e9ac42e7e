"""CAM inference, affinity labels, random walk and pseudo labels through their real command lines.

The models are tiny and random-init (the trained path is covered by the training tests and the demo):
these tests check the artifacts each script writes, resuming, and the errors on missing inputs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.affinitynet import AffinityNet
from core.semformer import SemFormerSegmentor
from tests.cli_runner import REPO, kill_when_files_appear, run_script
from tools.artifacts.files import load_label_png
from tools.artifacts.model_card import describe_model, write_card
from tools.artifacts.predictions import load_prediction
from tools.cli.presets import vit_kwargs
from tools.data.descriptor import load_descriptor
from tools.data.voc import VOCReader

TINY_SEGMENTOR = dict(**vit_kwargs("tiny"), image_size=64, class_dim=8, seg_dropout="token")
CAM = "SemFormer@tiny@train@scale=1.0,0.5"
READ_CLASSES = 256  # reading back in tests: any class id of a uint8 label map


@pytest.fixture(scope="module")
def stage_inputs(synthetic_dataset, tmp_path_factory):
    """Experiments root with a random tiny SemFormer and AffinityNet, and the shared dataset flags."""
    root = tmp_path_factory.mktemp("experiments")
    descriptor = load_descriptor(synthetic_dataset)
    torch.manual_seed(0)
    segmentor = SemFormerSegmentor(descriptor.num_classes, **TINY_SEGMENTOR)
    (root / "models").mkdir()
    model_path = root / "models" / "SemFormer@tiny.pth"
    torch.save({f"segmentor.{key}": value for key, value in segmentor.state_dict().items()}, model_path)
    write_card(model_path, describe_model("semformer", descriptor.num_classes, TINY_SEGMENTOR))
    torch.save(AffinityNet("resnet18").state_dict(), root / "models" / "AffinityNet@tiny.pth")
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(root), "--domain", "train"]
    return root, flags, descriptor


def cam_command(flags, *extra):
    return ["inference_semformer.py", "--tag", "SemFormer@tiny", "--scales", "1.0,0.5", "--cra_layers", "1",
            *flags, *extra]


def test_cam_files_have_the_artifact_layout(stage_inputs):
    root, flags, descriptor = stage_inputs
    output = run_script(*cam_command(flags))
    assert "python make_affinity_labels.py" in output
    reader = VOCReader(descriptor)
    for image_id in descriptor.read_ids("train"):
        cams = load_prediction(root / "predictions" / CAM / f"{image_id}.npz", READ_CLASSES)
        height, width = reader.image_size(image_id)
        present = np.flatnonzero(reader.load_label(image_id)) + 1
        assert cams["keys"].tolist() == [0, *present.tolist()]
        assert cams["cam"].shape == (len(present), (height + 3) // 4, (width + 3) // 4)
        assert cams["hr_cam"].shape == (len(present), height, width)
        assert cams["hr_cam"].dtype == np.float32 and 0.99 < cams["hr_cam"].max() < 1.0
    report = run_script("evaluate.py", "--experiment_name", CAM, *flags, "--n_jobs", "2")
    assert "best: Th=" in report


def test_killed_cam_inference_reruns_to_the_same_files(stage_inputs, tmp_path):
    root, flags, descriptor = stage_inputs
    ids = descriptor.read_ids("train")
    killed_flags = [*flags[:3], str(tmp_path), *flags[4:]]
    (tmp_path / "models").symlink_to(root / "models")
    out_dir = tmp_path / "predictions" / CAM
    process = subprocess.Popen([sys.executable, *cam_command(killed_flags)], cwd=REPO,  # threads as run_script's
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
    finished = kill_when_files_appear(process, out_dir, count=2)
    assert process.returncode == -signal.SIGKILL and 0 < finished < len(ids)

    output = run_script(*cam_command(killed_flags))
    assert f"{finished} of {len(ids)} CAM files already exist" in output
    reference = root / "predictions" / CAM
    if not reference.is_dir():
        run_script(*cam_command(flags))
    assert sorted(p.name for p in out_dir.glob("*.npz")) == sorted(f"{i}.npz" for i in ids)
    for image_id in ids:
        rerun = load_prediction(out_dir / f"{image_id}.npz", READ_CLASSES)
        uninterrupted = load_prediction(reference / f"{image_id}.npz", READ_CLASSES)
        for name in ("keys", "cam", "hr_cam"):
            np.testing.assert_array_equal(rerun[name], uninterrupted[name])


def test_affinity_labels_random_walk_and_pseudo_labels(stage_inputs):
    root, flags, descriptor = stage_inputs
    if not (root / "predictions" / CAM).is_dir():
        run_script(*cam_command(flags))
    ids = descriptor.read_ids("train")
    output = run_script("make_affinity_labels.py", "--experiment_name", CAM, *flags, "--n_jobs", "2")
    assert "python train_affinitynet.py" in output
    affinity_dir = root / "predictions" / f"{CAM}@aff_fg=0.11_bg=0.15"
    for image_id in ids:
        values = set(np.unique(load_label_png(affinity_dir / f"{image_id}.png")).tolist())
        assert values <= set(range(descriptor.num_classes)) | {255}

    run_script("inference_rw.py", "--model_name", "AffinityNet@tiny", "--architecture", "resnet18",
               "--cam_dir", CAM, "--image_size", "96", *flags)
    rw_name = "AffinityNet@tiny@train@beta=10@exp_times=8@rw"
    for image_id in ids:
        rw = load_prediction(root / "predictions" / rw_name / f"{image_id}.npz", READ_CLASSES)
        cams = load_prediction(root / "predictions" / CAM / f"{image_id}.npz", READ_CLASSES)
        assert rw["rw"].shape == cams["hr_cam"].shape and np.isclose(rw["rw"].max(), 1.0)
    report = run_script("evaluate.py", "--experiment_name", rw_name, "--mode", "rw", *flags, "--n_jobs", "2")
    assert "best: Th=" in report

    output = run_script("make_pseudo_labels.py", "--experiment_name", rw_name, *flags, "--n_jobs", "2")
    assert "--mode png" in output
    for image_id in ids:
        label = load_label_png(root / "predictions" / f"{rw_name}@crf=1" / f"{image_id}.png")
        assert set(np.unique(label).tolist()) <= set(range(descriptor.num_classes))
    report = run_script("evaluate.py", "--experiment_name", f"{rw_name}@crf=1", "--mode", "png", *flags)
    assert "mIoU=" in report
    label_dir = root / "predictions" / f"{rw_name}@crf=1"  # the report and its plot are not read as labels
    assert sorted(path.name for path in label_dir.glob("*.png")) == sorted(f"{image_id}.png" for image_id in ids)
    assert (label_dir / "reports" / "evaluation_train_png.json").is_file()
    assert (label_dir / "reports" / "evaluation_train_png.png").is_file()


def test_missing_previous_stage_names_the_first_id_and_the_command(stage_inputs):
    root, flags, descriptor = stage_inputs
    with pytest.raises(AssertionError) as failure:
        run_script("make_pseudo_labels.py", "--experiment_name", "NoSuchWalk", *flags)
    assert "python inference_rw.py" in str(failure.value) and "Traceback" not in str(failure.value)
    with pytest.raises(AssertionError) as failure:
        run_script("inference_rw.py", "--model_name", "Missing", "--cam_dir", CAM, *flags)
    assert "python train_affinitynet.py" in str(failure.value) or "files missing" in str(failure.value)


def test_loader_workers_give_the_same_cams_and_amp_falls_back_on_the_cpu(stage_inputs, tmp_path):
    root, flags, descriptor = stage_inputs
    folders = {}
    for name, extra in (("workers", ["--num_workers", "2"]), ("main", ["--num_workers", "0"]),
                        ("bf16", ["--amp", "bf16", "--num_workers", "0"])):
        experiments = tmp_path / name
        experiments.mkdir()
        (experiments / "models").symlink_to(root / "models")
        run_script(*cam_command([*flags[:3], str(experiments), *flags[4:]], *extra))
        folders[name] = experiments / "predictions" / CAM
    for image_id in descriptor.read_ids("train"):
        workers, main, bf16 = (load_prediction(folders[name] / f"{image_id}.npz", READ_CLASSES)
                               for name in ("workers", "main", "bf16"))
        for name in ("keys", "cam", "hr_cam"):
            np.testing.assert_array_equal(workers[name], main[name])
        assert bf16["hr_cam"].shape == main["hr_cam"].shape  # finite and well-formed: load_prediction checked

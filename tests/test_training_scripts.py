"""CAAE, SemFormer and AffinityNet training through their real command lines on the synthetic set."""
from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
import torch

import train_affinitynet
import train_caae
import train_semformer
from core.affinitynet import AffinityNet
from core.caae import CAAE
from core.cam import cam_activations
from core.losses import LossWeights
from core.path_index import PathIndex
from core.semformer import SemFormer, SemFormerSegmentor
from tests.cli_runner import run_completed, run_script
from tools.artifacts.files import ArtifactError, save_png
from tools.artifacts.paths import ExperimentPaths
from tools.artifacts.provenance import claim_output_folder, run_record
from tools.cli.exits import TrainingInterrupted
from tools.cli.presets import vit_flags
from tools.data.datasets import ClassificationDataset
from tools.data.descriptor import load_descriptor
from tools.data.transforms import semformer_train_transform
from tools.data.voc import VOCReader
from tools.training.state import load_checkpoint

TINY_VIT = ["--pretrained", "none", *vit_flags("tiny")]
TINY_CAAE = [*TINY_VIT, "--image_size", "64", "--decoder_width", "32", "--decoder_depth", "1",
             "--decoder_heads", "2", "--class_dim", "16"]
TINY_SEMFORMER = [*TINY_VIT, "--image_size", "64", "--min_image_size", "48", "--max_image_size", "96",
                  "--class_dim", "16"]
ENGINE = ["--batch_size", "4", "--max_epoch", "1", "--num_workers", "0"]
VOLATILE_LOG_FIELDS = ("time", "eta")
SELECTION_BAR = re.compile(r"validation: +\d+%\|")  # the checkpoint-selection pass's tqdm bar


def run_training(*args: str) -> str:
    """Run a training script that must succeed; its stdout, after checking that its stderr shows the selection
    pass's progress bar (the per-epoch scoring, about 20 minutes on a CPU at paper size)."""
    result = run_completed(*args)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert SELECTION_BAR.search(result.stderr), result.stderr
    return result.stdout


def test_caae_then_semformer_train_save_and_log(synthetic_dataset, tmp_path):
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path)]
    output = run_training("train_caae.py", "--tag", "CAAE@tiny", *TINY_CAAE, *ENGINE, *flags)
    assert "python train_semformer.py --tag SemFormer@CAAE@tiny --ae_tag CAAE@tiny --class_dim 16" in output
    models = tmp_path / "models"
    assert (models / "CAAE@tiny.pth").is_file() and (models / "CAAE@tiny.last.pth").is_file()
    log = json.loads((tmp_path / "logs" / "CAAE@tiny.json").read_text())
    assert log["train"] and 0.0 <= log["validation"][-1]["mAP"] <= 100.0

    output = run_training("train_semformer.py", "--tag", "SemFormer@tiny", "--ae_tag", "CAAE@tiny",
                          *TINY_SEMFORMER, *ENGINE, *flags)
    assert "python inference_semformer.py --tag SemFormer@tiny --domain train_aug --cra_layers 1" in output
    state = torch.load(models / "SemFormer@tiny.pth", weights_only=True)
    assert state and all(key.startswith("segmentor.") for key in state)  # the CAAE is not saved
    log = json.loads((tmp_path / "logs" / "SemFormer@tiny.json").read_text())
    entry = log["train"][-1]
    assert {"loss", "seg_sim", "cls_fg", "cls_bg", "act_supp", "act_cplt"} <= set(entry)
    assert 0.0 <= log["validation"][-1]["mIoU"] <= 100.0
    assert any((tmp_path / "tensorboards" / "SemFormer@tiny").iterdir())


def _train_log(paths: ExperimentPaths, tag: str) -> dict[str, list[dict]]:
    content = json.loads(paths.json_log(tag).read_text())
    return {kind: [{name: value for name, value in entry.items() if name not in VOLATILE_LOG_FIELDS}
                   for entry in entries] for kind, entries in content.items()}


def test_semformer_checkpoint_leaves_out_the_caae_and_resume_rebuilds_it_from_its_tag(synthetic_dataset, tmp_path,
                                                                                      monkeypatch):
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path)]
    train_caae.main(["--tag", "CAAE@tiny", *TINY_CAAE, *ENGINE, *flags])
    semformer = ["--ae_tag", "CAAE@tiny", *TINY_SEMFORMER, *ENGINE, *flags]
    train_semformer.main(["--tag", "whole", *semformer])
    paths = ExperimentPaths(tmp_path)

    steps, train_step = 0, train_semformer.train_step

    def step_then_sigterm(*args, **kwargs) -> dict:
        nonlocal steps
        steps += 1
        if steps == 3:  # the engine finishes this step, saves its checkpoint and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train_semformer, "train_step", step_then_sigterm)
    with pytest.raises(TrainingInterrupted):
        train_semformer.main(["--tag", "resumed", *semformer])
    monkeypatch.undo()
    checkpoint = load_checkpoint(paths.checkpoint("resumed"))
    assert checkpoint["global_step"] == 3 and checkpoint["frozen"]["modules"] == ["ae"]
    assert checkpoint["model"] and all(key.startswith("segmentor.") for key in checkpoint["model"])  # no CAAE

    train_semformer.main(["--tag", "resumed", *semformer, "--resume"])  # the CAAE comes back from CAAE@tiny
    assert _train_log(paths, "resumed") == _train_log(paths, "whole")
    for path in (paths.model, paths.checkpoint):
        whole, resumed = (load_checkpoint(path(tag)) for tag in ("whole", "resumed"))
        whole, resumed = whole.get("model", whole), resumed.get("model", resumed)
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)

    train_caae.main(["--tag", "CAAE@tiny", *TINY_CAAE, *ENGINE, *flags, "--overwrite", "--seed", "1"])
    with pytest.raises(ArtifactError, match="the frozen 'ae' of this run differ from those the checkpoint was"):
        train_semformer.main(["--tag", "resumed", *semformer, "--resume"])


def test_semformer_without_its_caae_names_the_missing_model(synthetic_dataset, tmp_path):
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path)]
    try:
        run_script("train_semformer.py", "--tag", "S", "--ae_tag", "Nope", *TINY_SEMFORMER, *ENGINE, *flags)
    except AssertionError as failure:
        message = str(failure)
    assert "Nope.pth: model file not found" in message and "python train_caae.py --tag Nope" in message


def test_semformer_loss_falls_on_a_fixed_batch(synthetic_dataset):
    torch.manual_seed(0)
    descriptor = load_descriptor(synthetic_dataset)
    dataset = ClassificationDataset(VOCReader(descriptor), descriptor.read_ids("train_aug")[:4],
                                    semformer_train_transform(64, 48, 96))
    batch = tuple(torch.stack(items) for items in zip(*(dataset[i] for i in range(4))))
    tiny = dict(backbone_name="deit_small_patch16_224", backbone_kwargs=dict(depth=2, embed_dim=32, num_heads=2))
    caae = CAAE(descriptor.num_classes, image_size=64, class_dim=16, decoder_width=32, decoder_depth=1,
                decoder_heads=2, **tiny)
    segmentor = SemFormerSegmentor(descriptor.num_classes, image_size=64, class_dim=16, dropout=0.0, **tiny)
    model = SemFormer(segmentor, caae)
    optimizer = torch.optim.SGD(segmentor.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(30):  # the training step of train_semformer.py, as the engine calls it
        loss = train_semformer.train_step(model, batch, ae_size=64, weights=LossWeights(),
                                          masked_suppression=False)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # the CAAE-based class terms of a random CAAE stay near 2; the rest of the loss must fall clearly
    assert losses[-1] < losses[0] - 0.4 and np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5])


def test_the_caae_and_affinitynet_steps_and_the_cam_activations_are_importable(synthetic_dataset):
    torch.manual_seed(0)
    tiny = dict(backbone_name="deit_small_patch16_224", backbone_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
    caae = CAAE(4, image_size=32, class_dim=8, decoder_width=16, decoder_depth=1, decoder_heads=2, **tiny)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    outputs = train_caae.train_step(caae, (images, labels), bce_weight=1.0, mse_weight=0.0)
    assert set(outputs) >= {"loss", "bce", "mse"} and outputs["loss"] == outputs["bce"]
    path_index = PathIndex(3, (8, 8))
    affinitynet = AffinityNet("resnet18", path_index=path_index).train()
    affinity_labels = torch.randint(0, 4, (2, 8, 8))
    outputs = train_affinitynet.train_step(affinitynet, (images, affinity_labels), path_index, num_classes=4)
    assert torch.isfinite(outputs["loss"])
    segmentor = SemFormerSegmentor(4, image_size=32, class_dim=8, **tiny).eval()
    with torch.no_grad():
        maps = cam_activations(segmentor, images, with_cra=True, cra_layers=1)
    assert maps.shape == (2, 4, 2, 2) and maps.min() >= 0


def test_affinitynet_trains_on_affinity_labels(synthetic_dataset, tmp_path):
    descriptor = load_descriptor(synthetic_dataset)
    reader = VOCReader(descriptor)
    ids = descriptor.read_ids("train")
    label_dir = tmp_path / "predictions" / "CAM@aff_fg=0.11_bg=0.15"  # no run.json inputs: the name tells the CAMs
    claim_output_folder(label_dir, run_record("hand-made GT labels", {}), ".png", overwrite=False)
    for image_id in ids:  # the GT with its ignore band stands in for affinity labels
        save_png(label_dir / f"{image_id}.png", reader.load_mask(image_id, required=True))
    flags = ["--dataset", str(synthetic_dataset), "--experiments_dir", str(tmp_path), "--domain", "train"]
    output = run_script("train_affinitynet.py", "--tag", "Aff@tiny", "--label_name", "CAM@aff_fg=0.11_bg=0.15",
                        "--architecture", "resnet18", "--pretrained", "none", "--image_size", "96", "--min_image_size", "64",
                        "--max_image_size", "96", "--batch_size", "2", "--max_epoch", "2", "--num_workers", "0",
                        *flags)
    assert "python inference_rw.py --model_name Aff@tiny --domain train" in output
    assert " --cam_dir CAM\n" in output
    log = json.loads((tmp_path / "logs" / "Aff@tiny.json").read_text())
    assert all(np.isfinite(entry["loss"]) for entry in log["train"])
    assert json.loads((tmp_path / "models" / "Aff@tiny.json").read_text())["backbone"] == "resnet18"

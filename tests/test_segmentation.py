"""Final segmentation stage: DeepLab models, losses, multi-scale inference, submission, and both CLIs."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core.checkpoint import CheckpointError
from core.deeplab import V2_DILATIONS, V3PLUS_LOW_LEVEL_CHANNELS, DeepLab
from core.losses import segmentation_loss
from core.multiscale import multiscale_probabilities
from tests.cli_runner import REPO, run_completed, run_failing, run_script
from tools.artifacts.files import ArtifactError, load_label_png, save_png
from tools.cli.exits import EXIT_INTERRUPTED, EXIT_USAGE
from tools.data.descriptor import load_descriptor
from tools.data.transforms import RandomScale
from tools.data.voc import VOCReader
from tools.scoring.crf import DEEPLAB_KERNELS, ORIGINAL_KERNELS, parse_crf_setting
from tools.scoring.metrics import ConfusionAccumulator
from tools.scoring.submission import check_submission_png
from tools.training.optimizer import parameter_groups

TINY_MODEL = ["--backbone", "resnet18", "--pretrained", "none", "--backbone_bn", "train"]
TINY_TRAINING = ["--crop_size", "64", "--scales", "0.75,1.0,1.25", "--batch_size", "4", "--num_workers", "0",
                 "--lr", "0.01"]
TAG = "DeepLab@tiny"


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("architecture, stride", [("deeplabv2", 8), ("deeplabv1", 8), ("deeplabv3plus", 4)])
def test_logits_stride_of_each_architecture(architecture, stride):
    model = DeepLab(5, architecture, "resnet18").eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 65, 97))
    assert logits.shape == (2, 5, math.ceil(65 / stride), math.ceil(97 / stride))


def test_v3plus_head_width_is_a_setting_of_v3plus_only():
    model = DeepLab(5, "deeplabv3plus", "resnet18", head_channels=64).eval()
    widths = {conv.out_channels for conv in model.head.modules() if isinstance(conv, torch.nn.Conv2d)}
    assert widths == {64, V3PLUS_LOW_LEVEL_CHANNELS, 5}  # pyramid and decoder, reduced stride-4 features, classes
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5, 16, 24)
    with pytest.raises(ValueError, match="deeplabv3plus only"):
        DeepLab(5, "deeplabv2", "resnet18", head_channels=64)


def test_deeplabv2_head_sums_four_dilated_convs_initialised_small():
    model = DeepLab(4, "deeplabv2", "resnet18")
    branches = model.head.branches
    assert [conv.dilation[0] for conv in branches] == list(V2_DILATIONS)
    assert all(conv.bias is not None and torch.all(conv.bias == 0) for conv in branches)
    weights = torch.cat([conv.weight.detach().flatten() for conv in branches])
    assert 0.009 < weights.std().item() < 0.011
    features = torch.randn(1, 512, 9, 9)
    expected = sum(torch.nn.functional.conv2d(features, conv.weight, conv.bias, padding=rate, dilation=rate)
                   for conv, rate in zip(branches, V2_DILATIONS))
    torch.testing.assert_close(model.head(features), expected)


def _conv_geometry(module: torch.nn.Module) -> list[tuple]:
    return [(conv.stride, conv.dilation, conv.padding)
            for conv in module.modules() if isinstance(conv, torch.nn.Conv2d)]


def test_bottleneck_backbone_is_torchvisions_dilated_resnet_with_frozen_bn():
    model = DeepLab(3, "deeplabv2", "resnet50")
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    assert _conv_geometry(model.backbone) == _conv_geometry(reference)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert not any(p.requires_grad for name, p in model.named_parameters() if "bn" in name)


def test_basic_block_backbone_is_dilated_by_the_same_rule():
    model = DeepLab(3, "deeplabv2", "resnet18")
    dilations = [conv.dilation[0] for conv in model.backbone.layer4.modules()
                 if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)]
    assert dilations == [2, 4, 4, 4]
    assert all(conv.stride == (1, 1) for conv in model.backbone.layer3.modules() if isinstance(conv, torch.nn.Conv2d))
    with torch.no_grad():
        assert model.backbone(torch.randn(1, 3, 64, 64))[1].shape[-2:] == (8, 8)


def test_optimiser_groups_put_backbone_at_1x_and_head_at_10x_20x():
    model = DeepLab(3, "deeplabv2", "resnet18", bn="train")
    groups = parameter_groups(model, lr=2.5e-4, weight_decay=5e-4)
    names = {id(p): name for name, p in model.named_parameters()}
    head_weights = {names[id(p)] for p in groups[2]["params"]}
    head_biases = {names[id(p)] for p in groups[3]["params"]}
    assert head_weights == {f"head.branches.{index}.weight" for index in range(4)}
    assert head_biases == {f"head.branches.{index}.bias" for index in range(4)}
    assert (groups[2]["lr"], groups[2]["weight_decay"]) == pytest.approx((2.5e-3, 5e-4))
    assert (groups[3]["lr"], groups[3]["weight_decay"]) == pytest.approx((5e-3, 0.0))
    assert all(names[id(p)].startswith("backbone.") for group in groups[:2] for p in group["params"])


def test_local_pretrained_file_loads_and_bad_ones_name_the_alternatives(tmp_path, monkeypatch):
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = DeepLab(3, "deeplabv2", "resnet18", pretrained=str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(CheckpointError, match="do not fit a resnet18"):
        DeepLab(3, "deeplabv2", "resnet18", pretrained=str(tmp_path / "resnet34.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        DeepLab(3, "deeplabv2", "resnet18", pretrained=str(tmp_path / "missing.pth"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError) as failure:
        DeepLab(3, "deeplabv2", "resnet18", pretrained="imagenet")
    assert "--pretrained PATH" in str(failure.value) and "--pretrained none" in str(failure.value)


# ----------------------------------------------------------------------------- losses
def test_balanced_ce_is_the_mean_of_background_and_foreground_means():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 3.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(1) / (math.exp(1) + 1))]
    result = segmentation_loss(logits, labels, "balanced_ce")
    assert result["bg_ce"].item() == pytest.approx(ce[0])
    assert result["fg_ce"].item() == pytest.approx(ce[1])
    assert result["loss"].item() == pytest.approx((ce[0] + ce[1]) / 2)

    logits = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])
    labels = torch.tensor([[[0, 1, 1]]])  # one background pixel, two foreground ones
    fg = -math.log(math.exp(1) / (math.exp(1) + 1))
    assert segmentation_loss(logits, labels, "balanced_ce")["loss"].item() == pytest.approx((ce[0] + fg) / 2)
    assert segmentation_loss(logits, labels, "ce")["loss"].item() == pytest.approx((ce[0] + 2 * fg) / 3)
    only_background = segmentation_loss(logits, torch.tensor([[[0, 0, 255]]]), "balanced_ce")
    assert only_background["loss"].item() == pytest.approx((ce[0] + -math.log(1 / (1 + math.e))) / 2)


@pytest.mark.parametrize("kind", ["balanced_ce", "ce"])
def test_ignored_pixels_carry_no_loss(kind):
    model = DeepLab(3, "deeplabv2", "resnet18", bn="train")
    images = torch.randn(2, 3, 48, 48)
    logits = torch.nn.functional.interpolate(model(images), size=(48, 48), mode="bilinear")
    result = segmentation_loss(logits, torch.full((2, 48, 48), 255), kind)
    result["loss"].backward()
    assert result["loss"].item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


# ----------------------------------------------------------------------------- inference
class ConstantModel(torch.nn.Module):
    """Logits ``(B, K, ceil(h/8), ceil(w/8))`` that are the same vector everywhere."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = (math.ceil(side / 8) for side in images.shape[-2:])
        return self.logits[None, :, None, None].expand(len(images), -1, height, width)


@pytest.mark.parametrize("fusion", ["mean_logits", "max_prob"])
def test_multiscale_flip_inference_of_constant_logits(fusion):
    image = torch.randn(3, 37, 53)
    probs = multiscale_probabilities(ConstantModel([0.1, 2.0, -1.0]), image, (0.5, 0.75, 1.0, 1.75), True, fusion)
    assert probs.shape == (3, 37, 53)
    assert torch.all(probs.argmax(0) == 1)
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))
    if fusion == "mean_logits":
        torch.testing.assert_close(probs[:, 0, 0], torch.tensor([0.1, 2.0, -1.0]).softmax(0))


def test_flipped_pass_is_flipped_back():
    """A model that labels each pixel by its own colour gives the same map with and without flips."""
    def pointwise(images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images[:, 0], -images[:, 0]], dim=1)

    image = torch.randn(3, 20, 30)
    with_flip = multiscale_probabilities(pointwise, image, (1.0,), flip=True)
    without = multiscale_probabilities(pointwise, image, (1.0,), flip=False)
    torch.testing.assert_close(with_flip, without)


def test_crf_settings_parse():
    assert parse_crf_setting("none") is None and parse_crf_setting("0") is None
    deeplab = parse_crf_setting("deeplab")
    assert (deeplab.iterations, deeplab.kernels) == (10, DEEPLAB_KERNELS)
    one = parse_crf_setting("1")
    assert (one.iterations, one.kernels, one.name) == (1, ORIGINAL_KERNELS, "1")
    with pytest.raises(ValueError):
        parse_crf_setting("strong")


def test_random_scale_draws_the_listed_factors_or_a_range():
    torch.manual_seed(0)
    choice = RandomScale((0.5, 2.0))
    assert {choice.output_size(40, 60) for _ in range(50)} == {(20, 30), (80, 120)}
    uniform = RandomScale((0.5, 1.5), "uniform")
    heights = [uniform.output_size(100, 100)[0] for _ in range(200)]
    assert 50 <= min(heights) < 60 and 140 < max(heights) <= 150


def test_submission_check_rejects_wrong_mode_palette_values_and_size(tmp_path, synthetic_dataset):
    descriptor = load_descriptor(synthetic_dataset)
    palette, classes = descriptor.palette, descriptor.num_classes
    label = np.zeros((6, 8), np.uint8)
    save_png(tmp_path / "good.png", label, palette)
    check_submission_png(tmp_path / "good.png", (6, 8), classes, palette)
    save_png(tmp_path / "gray.png", label)
    wrong_palette = palette.copy()
    wrong_palette[1] = (1, 2, 3)
    save_png(tmp_path / "palette.png", label, wrong_palette)
    label[0, 0] = classes
    save_png(tmp_path / "value.png", label, palette)
    for name, expected in (("gray", "mode P"), ("palette", "colour map"), ("value", "is not a class")):
        with pytest.raises(ArtifactError, match=expected):
            check_submission_png(tmp_path / f"{name}.png", (6, 8), classes, palette)
    with pytest.raises(ArtifactError, match="differs from the image"):
        check_submission_png(tmp_path / "good.png", (8, 6), classes, palette)


# ----------------------------------------------------------------------------- command lines
def _flags(synthetic_dataset, root) -> list[str]:
    return ["--dataset", str(synthetic_dataset), "--experiments_dir", str(root)]


def _gt_dir(synthetic_dataset) -> str:
    return str(synthetic_dataset.parent / "SegmentationClassAug")


def _all_background_miou(reader: VOCReader, ids: list[str], num_classes: int) -> float:
    accumulator = ConfusionAccumulator(num_classes)
    for image_id in ids:
        mask = reader.load_mask(image_id, required=True)
        accumulator.update(mask, np.zeros_like(mask))
    return accumulator.scores()[0].miou


def test_train_on_ground_truth_then_infer_score_and_submit(synthetic_dataset, tmp_path):
    flags = _flags(synthetic_dataset, tmp_path)
    output = run_script("train_segmentation.py", "--tag", TAG, "--label_dir", _gt_dir(synthetic_dataset),
                        *TINY_MODEL, *TINY_TRAINING, "--max_iters", "120", *flags)
    assert f"python inference_segmentation.py --tag {TAG} --domain val" in output
    config = json.loads((tmp_path / "models" / f"{TAG}.json").read_text())
    assert (config["kind"], config["architecture"], config["backbone"]) == ("deeplab", "deeplabv2", "resnet18")
    validation = json.loads((tmp_path / "logs" / f"{TAG}.json").read_text())["validation"]
    assert validation[-1]["iteration"] == 120

    output = run_script("inference_segmentation.py", "--tag", TAG, "--scales", "0.75,1.0", "--crf", "1",
                        "--submission", "--n_jobs", "2", *flags)
    name = f"{TAG}@val@scale=0.75,1.0@crf=1"
    assert f"python evaluate.py --experiment_name {name} --domain val --mode png" in output
    report = run_script("evaluate.py", "--experiment_name", name, "--mode", "png", "--domain", "val", *flags)
    descriptor = load_descriptor(synthetic_dataset)
    reader = VOCReader(descriptor)
    ids = descriptor.read_ids("val")
    result = json.loads((tmp_path / "predictions" / name / "reports" / "evaluation_val_png.json").read_text())
    baseline = _all_background_miou(reader, ids, descriptor.num_classes)
    assert result["best"]["miou"] > baseline + 15, (result["best"]["miou"], baseline, report)

    pred_dir = tmp_path / "predictions" / name
    folder = pred_dir / "results" / "VOC2012" / "Segmentation" / "comp6_val_cls"
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{image_id}.png" for image_id in ids)
    for image_id in ids:
        with Image.open(folder / f"{image_id}.png") as png:
            assert png.mode == "P" and (png.height, png.width) == reader.image_size(image_id)
            colours = descriptor.palette[: descriptor.num_classes].reshape(-1).tolist()
            assert png.getpalette()[: len(colours)] == colours
        assert load_label_png(folder / f"{image_id}.png").max() < descriptor.num_classes
    with tarfile.open(pred_dir / "results.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted(
            f"results/VOC2012/Segmentation/comp6_val_cls/{image_id}.png" for image_id in ids)
    assert sorted(path.name for path in pred_dir.glob("*.png")) == sorted(f"{image_id}.png" for image_id in ids)

    id_list = tmp_path / "my_val.txt"  # the whole val list under another name: still the server's val split
    id_list.write_text("\n".join(reversed(ids)) + "\n")
    output = run_script("inference_segmentation.py", "--tag", TAG, "--scales", "1.0", "--crf", "none", "--list",
                        str(id_list), "--submission", *flags)
    results = tmp_path / "predictions" / f"{TAG}@my_val@scale=1.0@crf=none" / "results" / "VOC2012" / "Segmentation"
    assert [path.name for path in results.iterdir()] == ["comp6_val_cls"]
    command = shlex.split(re.search(r"^Next: (.*)$", output, re.MULTILINE).group(1))
    assert command[:2] == ["python", "evaluate.py"] and command.count("--list") == 1
    assert "mIoU=" in run_script(*command[1:])  # as printed, with this interpreter for "python"


@pytest.mark.parametrize("ids", ["part of val", "train"])
def test_submission_refuses_ids_that_are_not_a_whole_test_or_val_list(synthetic_dataset, tmp_path, ids):
    descriptor = load_descriptor(synthetic_dataset)
    if ids == "train":
        chosen = ["--domain", "train"]
    else:
        id_list = tmp_path / "val5.txt"
        id_list.write_text("\n".join(descriptor.read_ids("val")[:5]) + "\n")
        chosen = ["--list", str(id_list)]
    result = run_completed("inference_segmentation.py", "--tag", TAG, *chosen, "--submission",
                           *_flags(synthetic_dataset, tmp_path))  # refused before the (missing) model is read
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_USAGE and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {' '.join(chosen)}: --submission needs a whole test or val list")
    assert not (tmp_path / "predictions").exists()


def test_sigterm_then_resume_equals_an_uninterrupted_run(synthetic_dataset, tmp_path):
    command = ["train_segmentation.py", "--tag", TAG, "--label_dir", _gt_dir(synthetic_dataset), *TINY_MODEL,
               *TINY_TRAINING, "--max_iters", "16"]
    run_script(*command, *_flags(synthetic_dataset, tmp_path / "whole"))
    interrupted = _flags(synthetic_dataset, tmp_path / "interrupted")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, *command, *interrupted], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in process.stdout:
        if "[train] iteration=3," in line:
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_INTERRUPTED  # stopped, checkpoint saved
    checkpoint = torch.load(tmp_path / "interrupted" / "models" / f"{TAG}.last.pth", weights_only=True)
    assert 3 <= checkpoint["global_step"] < 16
    run_script(*command, *interrupted, "--resume")
    for name in (f"{TAG}.pth", f"{TAG}.last.pth"):
        whole = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)
        resumed = torch.load(tmp_path / "interrupted" / "models" / name, weights_only=True)
        whole, resumed = whole.get("model", whole), resumed.get("model", resumed)
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[key], resumed[key]) for key in whole), name


def test_bad_labels_give_one_line_errors_naming_the_file(synthetic_dataset, tmp_path):
    descriptor = load_descriptor(synthetic_dataset)
    reader = VOCReader(descriptor)
    ids = descriptor.read_ids("train")
    label_dir = tmp_path / "labels"
    for image_id in ids:
        save_png(label_dir / f"{image_id}.png", reader.load_mask(image_id, required=True), descriptor.palette)

    def train(labels, *extra: str) -> str:  # batch 6 = the whole train list: every label is read
        error = run_failing("train_segmentation.py", "--tag", TAG, "--label_dir", str(labels), "--domain", "train",
                            *TINY_MODEL, *TINY_TRAINING, "--batch_size", "6", "--max_iters", "1",
                            *_flags(synthetic_dataset, tmp_path), *extra)
        assert "error: " in error, error
        return error

    (label_dir / f"{ids[1]}.png").unlink()
    error = train(label_dir)
    assert f"{ids[1]}.png" in error and "missing" in error

    height, width = reader.image_size(ids[1])
    save_png(label_dir / f"{ids[1]}.png", np.zeros((height + 1, width), np.uint8), descriptor.palette)
    error = train(label_dir)
    assert f"{ids[1]}.png: label size {width}x{height + 1} differs from the image's {width}x{height}" in error

    bad = reader.load_mask(ids[1], required=True).copy()
    bad[0, 0] = descriptor.num_classes
    save_png(label_dir / f"{ids[1]}.png", bad, descriptor.palette)
    error = train(label_dir)  # found while training: the last line, after the progress bar
    assert f"{ids[1]}.png: label value {descriptor.num_classes} is not a class" in error.strip().splitlines()[-1]

    assert "NoSuchLabels: folder not found" in train(tmp_path / "NoSuchLabels")


def test_bad_pretrained_and_crf_arguments_are_one_line_errors(synthetic_dataset, tmp_path):
    flags = _flags(synthetic_dataset, tmp_path)
    error = run_failing("train_segmentation.py", "--tag", TAG, "--label_dir", _gt_dir(synthetic_dataset),
                        "--backbone", "resnet18", "--pretrained", str(tmp_path / "nothing.pth"), "--max_iters", "1",
                        *flags)
    assert "nothing.pth: --pretrained file not found" in error
    error = run_failing("inference_segmentation.py", "--tag", TAG, "--crf", "strong", *flags)
    assert "--crf" in error
    error = run_failing("inference_segmentation.py", "--tag", "Missing", *flags)
    assert "Missing.pth: model file not found" in error and "python train_segmentation.py" in error

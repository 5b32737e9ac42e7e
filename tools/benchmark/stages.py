"""What one timed call of each benchmark stage does, built from the stage scripts' own code.

Every training stage is its script's ``build_model`` / ``build_segmentor``, ``make_train_step`` and the
optimiser of its flags (``tools.training.optimizer``, as the engine builds it); the inference and label
stages are the functions their scripts call, with the scripts' default constants. The scripts come through
``tools.cli.repository.stage_script`` (loaded by path), so the benchmark measures the code researchers edit.
A configuration is the script's own flags: ``paper`` its defaults, ``tiny`` the tiny preset and small sizes.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from core.cam import cam_activations, multiscale_cams
from core.conventions import CAM_STRIDE, IGNORE_INDEX
from core.random_walk import random_walk
from core.semformer import SEGMENTOR_PREFIX, SemFormer
from tools.artifacts.model_card import describe_model, write_model
from tools.artifacts.paths import ExperimentPaths
from tools.benchmark.inputs import (CAM_KEYS, GRID_BLUR_SIGMA, NUM_CLASSES, WALK_CLASSES, cam_like, photo_and_cams,
                                    random_class_labels, random_images, random_label_maps, random_photo, smooth_field,
                                    write_evaluation_inputs)
from tools.cli.model_args import caae_config, semformer_config
from tools.cli.presets import vit_flags
from tools.cli.repository import stage_script
from tools.data.transforms import cam_inputs
from tools.scoring.evaluation import SWEEP, EvaluationConfig, evaluate, sweep_thresholds
from tools.scoring.labels import affinity_label, scores_to_label
from tools.training.optimizer import build_optimizer, parameter_groups
from tools.training.precision import autocast

SIZES = ("tiny", "paper")
NO_WEIGHTS = ("--pretrained", "none")  # random weights: nothing is downloaded
BENCH_TAG = "bench"
TINY_CAAE = [*vit_flags("tiny", "caae"), "--image_size", "64", "--decoder_width", "64", "--decoder_depth", "1",
             "--decoder_heads", "2", "--class_dim", "32"]
TINY_SEGMENTOR = [*vit_flags("tiny"), "--image_size", "128", "--class_dim", "32"]
TINY_AE = [*vit_flags("tiny", "caae", prefix="ae_"), "--ae_image_size", "64", "--ae_decoder_width", "64",
           "--ae_decoder_depth", "1", "--ae_decoder_heads", "2"]
TINY_PHOTO = (90, 120)
VOC_PHOTO = (375, 500)


@dataclass(frozen=True)
class Bench:
    """One stage at one size: ``flags`` of its script (training: batch and sizes come from them), ``size``
    ``(H, W)`` of a photo or walk grid for the other stages (evaluation: the smallest and largest side),
    ``batch`` items of a timed call for them, and ``steps`` timed calls after ``warmup`` untimed ones."""

    steps: int
    warmup: int
    flags: tuple[str, ...] = ()
    size: tuple[int, int] | None = None
    batch: int = 1
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """Where and how a row runs (``amp``: off, bf16 or fp16); ``cleanup`` closes temporary folders."""

    device: torch.device
    amp: str
    jobs: int | None
    grad_checkpointing: bool
    batch_size: int | None
    cleanup: ExitStack
    script_flags: tuple[str, ...] = ()  # more flags of the training script (another --backbone, say)


@dataclass(frozen=True)
class Prepared:
    """A stage ready to time: ``run`` is one call, ``batch`` its items and ``size`` the column's ``(H, W)``."""

    run: Callable[[], object]
    batch: int
    size: tuple[int, int]


Prepare = Callable[[Bench, Setup], Prepared]


# ----------------------------------------------------------------------------- training steps
def training_args(script: str, bench: Bench, setup: Setup, *extra: str) -> argparse.Namespace:
    """The script's ``parse_args`` of the config's flags (plus random init, ``--grad_checkpointing`` and
    ``--batch_size`` when asked)."""
    flags = [*bench.flags, *NO_WEIGHTS, "--tag", BENCH_TAG, *setup.script_flags, *extra]
    if setup.grad_checkpointing and script in ("train_caae", "train_semformer"):
        flags.append("--grad_checkpointing")
    if setup.batch_size:
        flags += ["--batch_size", str(setup.batch_size)]
    return stage_script(script).parse_args(flags)


def optimiser_step(model: nn.Module, trained: nn.Module, step: Callable[[nn.Module, Any], dict[str, Tensor]],
                   batch: Any, args: argparse.Namespace, setup: Setup) -> Callable[[], None]:
    """One optimiser step of ``step`` on ``batch``, with the optimiser the script's flags give ``trained``."""
    groups = parameter_groups(trained, args.lr, args.wd)
    optimizer = build_optimizer(groups, args.lr, args.wd, args.momentum, args.nesterov, args.optimizer)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.amp == "fp16")
    model.to(setup.device).train()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(setup.device, setup.amp):
            loss = step(model, batch)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return run


def prepare_caae(bench: Bench, setup: Setup) -> Prepared:
    """``train_caae.py``'s model and step on ``(B, 3, S, S)`` images with image-level labels."""
    script = stage_script("train_caae")
    args = training_args("train_caae", bench, setup)
    model = script.build_model(args, NUM_CLASSES)
    batch = (random_images(args.batch_size, args.image_size, setup.device),
             random_class_labels(args.batch_size, setup.device))
    run = optimiser_step(model, model, script.make_train_step(args), batch, args, setup)
    return Prepared(run, args.batch_size, (args.image_size, args.image_size))


def save_random_caae(caae_flags: tuple[str, ...], setup: Setup) -> Path:
    """A CAAE of ``train_caae.py``'s ``caae_flags`` with random weights and its card, in a temporary
    experiments folder (what ``train_semformer.py --ae_tag`` reads); returns that folder."""
    folder = Path(setup.cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-caae-")))
    caae_args = stage_script("train_caae").parse_args([*caae_flags, *NO_WEIGHTS])
    caae = stage_script("train_caae").build_model(caae_args, NUM_CLASSES)
    card = describe_model("caae", NUM_CLASSES, caae_config(caae_args))
    write_model(ExperimentPaths(folder).model(BENCH_TAG), card, lambda path: torch.save(caae.state_dict(), path))
    return folder


def prepare_semformer(bench: Bench, setup: Setup) -> Prepared:
    """``train_semformer.py``'s segmentor, frozen CAAE (``build_caae`` of a random one) and step on
    ``(B, 3, S, S)`` crops that fill the image (crop boxes of the whole crop)."""
    script = stage_script("train_semformer")
    folder = save_random_caae(bench.settings["caae_flags"], setup)
    args = training_args("train_semformer", bench, setup, "--ae_tag", BENCH_TAG, "--experiments_dir", str(folder))
    segmentor = script.build_segmentor(args, NUM_CLASSES)
    caae, ae_size = script.build_caae(args, NUM_CLASSES, ExperimentPaths(folder))
    size = args.image_size
    boxes = torch.tensor([[0, 0, size, size]] * args.batch_size, device=setup.device)
    batch = (random_images(args.batch_size, size, setup.device), random_class_labels(args.batch_size, setup.device),
             boxes)
    run = optimiser_step(SemFormer(segmentor, caae), segmentor, script.make_train_step(args, ae_size), batch, args,
                         setup)
    return Prepared(run, args.batch_size, (size, size))


def prepare_affinitynet(bench: Bench, setup: Setup) -> Prepared:
    """``train_affinitynet.py``'s model (pairs within ``--radius`` on the stride-4 grid) and step, the pair
    targets built from ``(B, S/4, S/4)`` label maps at every step as the script does."""
    script = stage_script("train_affinitynet")
    args = training_args("train_affinitynet", bench, setup, "--label_name", BENCH_TAG)
    model, path_index = script.build_model(args)
    grid = args.image_size // CAM_STRIDE
    batch = (random_images(args.batch_size, args.image_size, setup.device),
             random_label_maps(args.batch_size, grid, grid, setup.device))
    run = optimiser_step(model, model, script.make_train_step(path_index, NUM_CLASSES), batch, args, setup)
    return Prepared(run, args.batch_size, (args.image_size, args.image_size))


def prepare_deeplab(bench: Bench, setup: Setup) -> Prepared:
    """``train_segmentation.py``'s DeepLab and step on ``(B, 3, S, S)`` crops against ``(B, S, S)`` labels."""
    script = stage_script("train_segmentation")
    args = training_args("train_segmentation", bench, setup, "--label_name", BENCH_TAG)
    model = script.build_model(args, NUM_CLASSES)
    size = args.crop_size
    batch = (random_images(args.batch_size, size, setup.device),
             random_label_maps(args.batch_size, size, size, setup.device))
    run = optimiser_step(model, model, script.make_train_step(args, IGNORE_INDEX), batch, args, setup)
    return Prepared(run, args.batch_size, (size, size))


# ----------------------------------------------------------------------------- inference and labels
def prepare_cam(bench: Bench, setup: Setup) -> Prepared:
    """The loop body of ``inference_semformer.py`` on a ``(H, W)`` photo with ``CAM_KEYS``: its
    ``build_segmentor`` (random weights of ``train_semformer.py``'s flags), its scales and CRA layers; the
    photo's scaled inputs (which its DataLoader workers resize ahead of the model, so outside the timing)
    moved to the device, and ``multiscale_cams``."""
    folder = Path(setup.cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-cam-")))
    train_args = stage_script("train_semformer").parse_args([*bench.flags, *NO_WEIGHTS, "--ae_tag", BENCH_TAG,
                                                             *setup.script_flags])
    segmentor = stage_script("train_semformer").build_segmentor(train_args, NUM_CLASSES)
    model_path = ExperimentPaths(folder).model(BENCH_TAG)
    weights = {SEGMENTOR_PREFIX + key: value for key, value in segmentor.state_dict().items()}
    write_model(model_path, describe_model("semformer", NUM_CLASSES, semformer_config(train_args)),
                lambda path: torch.save(weights, path))
    inference = stage_script("inference_semformer")
    args = inference.parse_args(["--tag", BENCH_TAG, "--experiments_dir", str(folder), *bench.settings["flags"]])
    segmentor = inference.build_segmentor(args, NUM_CLASSES, model_path).to(setup.device).eval()
    photo = Image.fromarray(random_photo(np.random.default_rng(0), bench.size))
    inputs = cam_inputs(photo, args.scales, segmentor.backbone.patch_size)
    activations = functools.partial(cam_activations, segmentor, with_cra=args.with_cra, cra_layers=args.cra_layers)

    def run() -> dict[str, np.ndarray]:
        on_device = [scaled.to(setup.device, non_blocking=True) for scaled in inputs]
        with autocast(setup.device, setup.amp):
            return multiscale_cams(activations, on_device, bench.size, CAM_KEYS, segmentor.backbone.patch_size,
                                   args.exact_hr_cam)

    return Prepared(run, 1, bench.size)


def prepare_affinity_label(bench: Bench, setup: Setup) -> Prepared:
    """``affinity_label`` of a ``(H, W)`` photo's two class CAMs with ``make_affinity_labels.py``'s defaults."""
    args = stage_script("make_affinity_labels").parse_args(["--experiment_name", BENCH_TAG])
    photo, hr_cam = photo_and_cams(bench.size, len(CAM_KEYS) - 1)
    run = functools.partial(affinity_label, photo, hr_cam, CAM_KEYS, args.fg_threshold, args.bg_threshold,
                            args.crf_iteration)
    return Prepared(run, 1, bench.size)


def prepare_pseudo_label(bench: Bench, setup: Setup) -> Prepared:
    """``scores_to_label`` of a ``(H, W)`` photo's two class maps with ``make_pseudo_labels.py``'s threshold
    and the CRF iterations of the paper's command (``--crf_iteration 1``)."""
    args = stage_script("make_pseudo_labels").parse_args(["--experiment_name", BENCH_TAG, "--crf_iteration", "1"])
    photo, scores = photo_and_cams(bench.size, len(CAM_KEYS) - 1)
    run = functools.partial(scores_to_label, scores, CAM_KEYS, args.threshold, photo, args.crf_iteration)
    return Prepared(run, 1, bench.size)


def prepare_random_walk(bench: Bench, setup: Setup) -> Prepared:
    """``random_walk`` of ``WALK_CLASSES`` CAM channels on an ``(h, w)`` grid with ``inference_rw.py``'s radius,
    beta and length, on the inputs' device. The edge map is a squared smooth field (mostly low, with ridges)."""
    args = stage_script("inference_rw").parse_args(["--model_name", BENCH_TAG, "--cam_dir", BENCH_TAG])
    rng = np.random.default_rng(0)
    edge = torch.from_numpy(cam_like(rng, 1, *bench.size, GRID_BLUR_SIGMA)[0]).to(setup.device)
    cam = torch.from_numpy(smooth_field(rng, WALK_CLASSES, *bench.size, GRID_BLUR_SIGMA)).to(setup.device)
    run = functools.partial(random_walk, cam, edge, args.radius, args.beta, args.exp_times, args.background)
    return Prepared(run, 1, bench.size)


def prepare_evaluation(bench: Bench, setup: Setup) -> Prepared:
    """``evaluate`` (npy mode, ``evaluate.py``'s 31-threshold sweep with erosion) of ``bench.batch`` random
    predictions on ``setup.jobs`` processes."""
    folder = Path(setup.cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-evaluation-")))
    ids = write_evaluation_inputs(folder, bench.batch, bench.size)
    config = EvaluationConfig(pred_dir=folder / "predictions", gt_dir=folder / "gt", mode="npy",
                              thresholds=sweep_thresholds(*SWEEP), num_classes=NUM_CLASSES)
    return Prepared(lambda: evaluate(config, ids, setup.jobs), bench.batch, bench.size)


# ----------------------------------------------------------------------------- stages and configs
@dataclass(frozen=True)
class Stage:
    """How a stage is prepared and reported.

    ``unit``: images/s, s/image or s (per call); ``on_device``: runs on ``--device`` (else on the CPU);
    ``amp``: the autocast settings it is timed with on a GPU (empty: it has none);
    ``size_format``: the size column, formatted with ``(H, W)``.
    """

    prepare: Prepare
    unit: str
    on_device: bool
    amp: tuple[str, ...] = ()
    size_format: str = "{1}x{0} px"
    training: bool = False


TRAINING_AMP = ("auto",)  # bf16 where the GPU has it, else fp16
CAM_AMP = ("off", "bf16")


def training_stage(prepare: Prepare) -> Stage:
    return Stage(prepare, "images/s", True, TRAINING_AMP, training=True)


STAGES: dict[str, Stage] = {
    "caae": training_stage(prepare_caae),
    "semformer": training_stage(prepare_semformer),
    "affinitynet": training_stage(prepare_affinitynet),
    "deeplab": training_stage(prepare_deeplab),
    "cam": Stage(prepare_cam, "images/s", True, CAM_AMP),
    "affinity_label": Stage(prepare_affinity_label, "images/s", False),
    "random_walk": Stage(prepare_random_walk, "s/image", True, size_format="{1}x{0} grid"),
    "pseudo_label": Stage(prepare_pseudo_label, "images/s", False),
    "evaluation": Stage(prepare_evaluation, "s", False, size_format="{0}-{1} px"),
}

CONFIGS: dict[str, dict[str, Bench]] = {
    "caae": {"tiny": Bench(3, 1, (*TINY_CAAE, "--batch_size", "16")), "paper": Bench(5, 2)},
    "semformer": {"tiny": Bench(3, 1, (*TINY_SEGMENTOR, *TINY_AE, "--batch_size", "8"),
                                settings={"caae_flags": tuple(TINY_CAAE)}),
                  "paper": Bench(5, 2, settings={"caae_flags": ()})},
    "affinitynet": {"tiny": Bench(3, 1, ("--architecture", "resnet18", "--image_size", "128", "--batch_size", "4")),
                    "paper": Bench(5, 2)},
    "deeplab": {"tiny": Bench(3, 1, ("--architecture", "deeplabv3plus", "--backbone", "resnet18", "--backbone_bn",
                                     "train", "--crop_size", "96", "--batch_size", "8")),  # the demo's model
                "paper": Bench(5, 2)},
    "cam": {"tiny": Bench(4, 1, tuple(TINY_SEGMENTOR), TINY_PHOTO, settings={"flags": ("--cra_layers", "1")}),
            "paper": Bench(10, 2, (), VOC_PHOTO, settings={"flags": ()})},
    "affinity_label": {"tiny": Bench(4, 1, size=TINY_PHOTO), "paper": Bench(5, 1, size=VOC_PHOTO)},
    "random_walk": {"tiny": Bench(5, 1, size=(57, 75)), "paper": Bench(5, 1, size=(94, 125))},
    "pseudo_label": {"tiny": Bench(4, 1, size=TINY_PHOTO), "paper": Bench(5, 1, size=VOC_PHOTO)},
    "evaluation": {"tiny": Bench(1, 0, size=(120, 260), batch=200), "paper": Bench(1, 0, size=(375, 500), batch=200)},
}

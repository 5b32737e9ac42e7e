"""Benchmarks of every pipeline stage: throughput and peak memory, each row measured in a fresh process.

    make bench                                         # = python -m tools.bench --all
    python -m tools.bench --all                        # tiny configs on the CPU, plus paper configs on a GPU
    python -m tools.bench --config tiny                # every stage at tiny sizes on the CPU (seconds)
    python -m tools.bench --config paper --stage cam random_walk --device cuda
    python -m tools.bench --config semformer-paper --amp bf16 --grad_checkpointing   # <stage>-<size>
    python -m tools.bench --stage evaluation --jobs 2 --out /tmp/bench

Stages (``--stage``; all by default) and what one timed call does:

- ``caae``, ``semformer``, ``affinitynet``, ``deeplab``: a training step (forward, backward, SGD) on a
  random batch with random weights (no download): iterations/s and images/s.
- ``cam``: ``core.cam.multiscale_cams`` of one photo with a SemFormer segmentor, activations
  ReLU(seg logits) x class-relevant attention as in ``inference_semformer.py``: images/s.
- ``affinity_label``: ``tools.labels.affinity_label`` of one photo (two 10-iteration label CRFs): images/s.
- ``random_walk``: ``core.random_walk.random_walk`` of 2 CAM channels (radius 5, beta 10, exp_times 8) on the
  inputs' device: seconds per image.
- ``pseudo_label``: ``tools.labels.scores_to_label`` with a 1-iteration CRF: images/s.
- ``evaluation``: ``tools.evaluation.evaluate`` of a temporary folder of random ``.npz`` predictions (1-3
  classes) and GT PNGs, 31 thresholds with erosion, on one job and on all cores: seconds per sweep.

Sizes (``--config``): ``tiny`` takes seconds on a CPU; ``paper`` is the paper's setting (DeiT-S 448 px
SemFormer with a frozen DeiT-B CAAE, DeiT-B CAAE 224 px batch 64, ResNet-50 AffinityNet 512 px batch 32
with radius-10 pairs on its 128x128 grid, DeepLabV2-ResNet-101 321 px batch 10, VOC-sized 500x375 photos
and their 125x94 walk grid); hours on a CPU. The old single-stage names (``caae-tiny``, ``semformer-paper``,
``deeplabv2-paper``...) pick one training stage. Torch stages run on ``--device`` (default: the CPU for
tiny, the GPU if there is one for paper); the CRF and evaluation stages always run on the CPU. ``--all``
runs tiny on the CPU, and paper on the GPU where one is present. ``--amp`` defaults to bf16 autocast for
training on a GPU (fp16 where bf16 is missing), fp32 and bf16 for CAMs on a GPU, fp32 on the CPU.

Inputs are smooth random fields (blurred noise: CRFs and walks see regions, not pixel noise). The first
``--warmup`` calls are untimed; a row's throughput comes from the mean of ``--steps`` timed calls (with
``--repeat N``, of the fastest of N processes: on a shared machine compare minima, and note the load).
Peak memory is the CUDA allocator's peak on a GPU; on the CPU the growth of the peak resident set size
over the row's process after its imports (worker processes included: their largest peak counts). Each
row runs in a fresh process forked from a server that has only imported the libraries, so rows cannot
mask each other's peaks, thread pools or allocator caches, and the imports are paid once.

Writes ``<out>/bench.json`` (a header: devices, package versions, torch threads, cores, load averages,
git commit; one entry per row) and ``<out>/bench.md`` (the same as a Markdown table, also printed). A row
that fails keeps its error as a note; the run then exits with status 1 once both files are written.
"""
from __future__ import annotations

import argparse
import functools
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from core.affinitynet import AffinityNet, affinity_loss
from core.caae import CAAE
from core.cam import cam_activations, multiscale_cams
from core.conventions import CAM_STRIDE, IGNORE_INDEX
from core.deeplab import DeepLab
from core.losses import LossWeights, caae_loss, segmentation_loss, semformer_loss
from core.random_walk import PathIndex, affinity_targets, random_walk
from core.semformer import SemFormer, SemFormerSegmentor, ae_inputs
from tools.arguments import StageArgumentParser, non_negative_int, positive_int
from tools.artifacts import atomic_write_text, save_npz, save_png
from tools.cli import run_main
from tools.distributed import parse_device
from tools.evaluation import EvaluationConfig, evaluate, sweep_thresholds
from tools.labels import affinity_label, scores_to_label, threshold_argmax
from tools.optimizer import build_optimizer, parameter_groups
from tools.parallel import default_jobs
from tools.precision import AMP_CHOICES, autocast, resolve_amp
from tools.presets import vit_kwargs
from tools.provenance import git_state, package_versions
from tools.transforms import cam_inputs

NUM_CLASSES = 21
SIZES = ("tiny", "paper")
DEFAULT_OUT = Path("experiments/bench")
JSON_NAME, MARKDOWN_NAME = "bench.json", "bench.md"
MIB = 2**20
RSS_UNITS_PER_MIB = 1024  # ru_maxrss is in KiB on Linux
LR, WEIGHT_DECAY = 0.01, 5e-4
CLASS_PROBABILITY = 0.15  # of each foreground class in a random image-level label
IGNORED_FRACTION = 0.05  # of the pixels of a random label map set to 255
PHOTO_BLUR_SIGMA = 8.0  # px of a photo or a full-resolution CAM
GRID_BLUR_SIGMA = 2.0  # cells of a stride-4 walk grid (the same scale)
CAM_KEYS = np.array([0, 5, 12])  # background and two classes
WALK_CLASSES = 2
AFFINITY_THRESHOLDS = (0.11, 0.15)  # the paper's fg / bg background thresholds
PSEUDO_LABEL_THRESHOLD = 0.25
PSEUDO_LABEL_CRF_ITERATIONS = 1
EVALUATION_SWEEP = (0.10, 0.40, 0.01)  # min, max, step: the original's 31 thresholds
EVALUATION_CLASSES = (1, 3)  # fewest and most classes of a random prediction
GT_THRESHOLD = 0.25  # background threshold of the random GT maps
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
# What the fork server imports once for every row: the libraries that take seconds to import. Not this
# module: each row's process imports it again as its main module, which is quick once they are loaded.
PRELOAD_MODULES = ["torch", "torchvision", "timm", "cv2"]


@dataclass(frozen=True)
class Bench:
    """One stage at one size.

    ``batch``: items of a timed call (training images, photos, walks, predictions); ``size``: ``(H, W)``
    of an image, photo or walk grid (evaluation: the smallest and largest side); ``settings``: the
    stage's own keyword arguments.
    """

    batch: int
    size: tuple[int, int]
    steps: int
    warmup: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """Where and how a row runs (``amp``: off, bf16 or fp16)."""

    device: torch.device
    amp: str
    jobs: int | None
    grad_checkpointing: bool
    cleanup: ExitStack


Prepare = Callable[[Bench, Setup], Callable[[], object]]
TrainingParts = tuple[nn.Module, nn.Module, Callable[[], Tensor]]


# ----------------------------------------------------------------------------- random inputs
def smooth_field(rng: np.random.Generator, channels: int, height: int, width: int, sigma: float) -> np.ndarray:
    """``(channels, height, width)`` float32 in ``[0, 1]``: uniform noise blurred by a Gaussian of ``sigma``
    pixels, stretched by one minimum and maximum over all channels."""
    noise = rng.random((channels, height, width), dtype=np.float32)
    blurred = np.stack([cv2.GaussianBlur(plane, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) for plane in noise])
    low, high = blurred.min(), blurred.max()
    return (blurred - low) / (high - low)


def cam_like(rng: np.random.Generator, channels: int, height: int, width: int, sigma: float) -> np.ndarray:
    """Class scores ``(channels, H, W)`` in ``[0, 1]``, mostly low with smooth peaks (a squared field)."""
    return smooth_field(rng, channels, height, width, sigma) ** 2


def random_photo(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 photo ``(H, W, 3)`` of smooth colour regions."""
    return (smooth_field(rng, 3, *size, PHOTO_BLUR_SIGMA).transpose(1, 2, 0) * 255).astype(np.uint8)


def photo_and_cams(size: tuple[int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 photo ``(H, W, 3)`` and CAMs ``(channels, H, W)`` of the same size."""
    rng = np.random.default_rng(0)
    return random_photo(rng, size), cam_like(rng, channels, *size, PHOTO_BLUR_SIGMA)


def random_images(bench: Bench, device: torch.device) -> Tensor:
    """A normal ``(B, 3, H, W)`` batch."""
    return torch.randn(bench.batch, 3, *bench.size, device=device)


def random_class_labels(batch: int, device: torch.device) -> Tensor:
    """Image-level labels ``(B, K)`` with the background always present."""
    labels = (torch.rand(batch, NUM_CLASSES, device=device) < CLASS_PROBABILITY).float()
    labels[:, 0] = 1
    return labels


def random_label_maps(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """Label maps ``(B, H, W)`` of random classes with ``IGNORED_FRACTION`` of the pixels at 255."""
    labels = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    return labels.masked_fill(torch.rand(labels.shape, device=device) < IGNORED_FRACTION, IGNORE_INDEX)


# ----------------------------------------------------------------------------- training steps
def caae_parts(bench: Bench, device: torch.device, grad_checkpointing: bool) -> TrainingParts:
    """A CAAE reconstructing ``(B, 3, S, S)`` images under image-level labels."""
    model = CAAE(NUM_CLASSES, image_size=bench.size[0], grad_checkpointing=grad_checkpointing,
                 **bench.settings["caae"]).to(device)
    images, labels = random_images(bench, device), random_class_labels(bench.batch, device)
    return model, model, lambda: caae_loss(*model(images, labels), labels, images)["loss"]


def semformer_parts(bench: Bench, device: torch.device, grad_checkpointing: bool) -> TrainingParts:
    """A SemFormer segmentor on ``(B, 3, S, S)`` crops, scored by a frozen CAAE at ``ae_image_size``."""
    ae_size = bench.settings["ae_image_size"]
    caae = CAAE(NUM_CLASSES, image_size=ae_size, grad_checkpointing=grad_checkpointing, **bench.settings["caae"])
    segmentor = SemFormerSegmentor(NUM_CLASSES, image_size=bench.size[0], class_dim=caae.class_dim,
                                   grad_checkpointing=grad_checkpointing, **bench.settings["segmentor"])
    model = SemFormer(segmentor, caae).to(device)
    images, labels = random_images(bench, device), random_class_labels(bench.batch, device)
    boxes = torch.tensor([[0, 0, bench.size[1], bench.size[0]]] * bench.batch, device=device)

    def loss() -> Tensor:
        ae_images, grad_masks = ae_inputs(images, boxes, ae_size)
        outputs = model(images, ae_images, labels, grad_masks)
        return semformer_loss(outputs, labels, grad_masks, LossWeights())["loss"]

    return model, segmentor, loss


def affinitynet_parts(bench: Bench, device: torch.device, grad_checkpointing: bool) -> TrainingParts:
    """AffinityNet's edge branch on ``(B, 3, S, S)`` crops, pairs within ``radius`` on the ``S / 4`` grid,
    the pair targets built from ``(B, S/4, S/4)`` label maps at every step as in ``train_affinitynet.py``."""
    grid = (bench.size[0] // CAM_STRIDE, bench.size[1] // CAM_STRIDE)
    path_index = PathIndex(bench.settings["radius"], grid)
    model = AffinityNet(bench.settings["backbone"], "none", path_index).to(device)
    images, labels = random_images(bench, device), random_label_maps(bench.batch, *grid, device)

    def loss() -> Tensor:
        targets = [affinity_targets(label, path_index, NUM_CLASSES) for label in labels]
        bg_pos, fg_pos, neg = (torch.stack(kind) for kind in zip(*targets))
        return affinity_loss(model.affinity(model(images)), bg_pos, fg_pos, neg)["loss"]

    return model, model, loss


def deeplab_parts(bench: Bench, device: torch.device, grad_checkpointing: bool) -> TrainingParts:
    """DeepLab on ``(B, 3, S, S)`` crops against ``(B, S, S)`` label maps (logits upsampled to the crop)."""
    model = DeepLab(NUM_CLASSES, **bench.settings).to(device)
    images, masks = random_images(bench, device), random_label_maps(bench.batch, *bench.size, device)

    def loss() -> Tensor:
        logits = F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return segmentation_loss(logits, masks)["loss"]

    return model, model, loss


def prepare_training(parts: Callable[[Bench, torch.device, bool], TrainingParts], bench: Bench,
                     setup: Setup) -> Callable[[], None]:
    """One SGD step of the model ``parts`` builds (its second module's parameters train)."""
    model, trained, loss_of_batch = parts(bench, setup.device, setup.grad_checkpointing)
    model.train()
    optimizer = build_optimizer(parameter_groups(trained, LR, WEIGHT_DECAY), LR, WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.amp == "fp16")

    def step() -> None:
        with autocast(setup.device, setup.amp):
            loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


# ----------------------------------------------------------------------------- inference and labels
def prepare_cam(bench: Bench, setup: Setup) -> Callable[[], dict[str, np.ndarray]]:
    """``multiscale_cams`` of a ``(H, W)`` photo with ``CAM_KEYS``, CRA of the last ``cra_layers`` blocks.

    A call is the loop body of ``inference_semformer.py``: the photo's scaled inputs (which its DataLoader
    workers resize ahead of the model, so outside the timing) moved to the device, and the CAMs.
    """
    settings = bench.settings
    segmentor = SemFormerSegmentor(NUM_CLASSES, image_size=settings["image_size"], **settings["segmentor"])
    segmentor.to(setup.device).eval()
    photo = Image.fromarray(random_photo(np.random.default_rng(0), bench.size))
    inputs = cam_inputs(photo, settings["scales"], segmentor.backbone.patch_size)

    activations = functools.partial(cam_activations, segmentor, with_cra=True, cra_layers=settings["cra_layers"])

    def cams() -> dict[str, np.ndarray]:
        on_device = [scaled.to(setup.device, non_blocking=True) for scaled in inputs]
        with autocast(setup.device, setup.amp):
            return multiscale_cams(activations, on_device, bench.size, CAM_KEYS, segmentor.backbone.patch_size)

    return cams


def prepare_affinity_label(bench: Bench, setup: Setup) -> Callable[[], np.ndarray]:
    """``affinity_label`` of a ``(H, W)`` photo and its two class CAMs at the paper's thresholds."""
    photo, hr_cam = photo_and_cams(bench.size, len(CAM_KEYS) - 1)
    return lambda: affinity_label(photo, hr_cam, CAM_KEYS, *AFFINITY_THRESHOLDS)


def prepare_pseudo_label(bench: Bench, setup: Setup) -> Callable[[], np.ndarray]:
    """``scores_to_label`` of a ``(H, W)`` photo's two class maps with a 1-iteration CRF."""
    photo, scores = photo_and_cams(bench.size, len(CAM_KEYS) - 1)
    return lambda: scores_to_label(scores, CAM_KEYS, PSEUDO_LABEL_THRESHOLD, photo, PSEUDO_LABEL_CRF_ITERATIONS)


def prepare_random_walk(bench: Bench, setup: Setup) -> Callable[[], Tensor]:
    """``random_walk`` of ``WALK_CLASSES`` CAM channels on an ``(h, w)`` grid, on the inputs' device.

    The edge map is a squared smooth field (mostly low, with ridges), the CAMs smooth fields.
    """
    rng = np.random.default_rng(0)
    edge = torch.from_numpy(cam_like(rng, 1, *bench.size, GRID_BLUR_SIGMA)[0]).to(setup.device)
    cam = torch.from_numpy(smooth_field(rng, WALK_CLASSES, *bench.size, GRID_BLUR_SIGMA)).to(setup.device)
    return lambda: random_walk(cam, edge)


def write_evaluation_inputs(folder: Path, count: int, sides: tuple[int, int]) -> list[str]:
    """``count`` predictions ``<id>.npz`` (``keys``, ``hr_cam (n, H, W)``) under ``folder/predictions`` and
    their GT PNGs under ``folder/gt``; every image has its own ``H, W`` in ``sides`` and 1-3 classes."""
    rng = np.random.default_rng(0)
    ids = [f"{index:05d}" for index in range(count)]
    for image_id in ids:
        height, width = (int(side) for side in rng.integers(sides[0], sides[1] + 1, size=2))
        count = rng.integers(EVALUATION_CLASSES[0], EVALUATION_CLASSES[1] + 1)
        classes = rng.choice(np.arange(1, NUM_CLASSES), count, replace=False)
        keys = np.concatenate([[0], np.sort(classes)])
        hr_cam = cam_like(rng, len(classes), height, width, PHOTO_BLUR_SIGMA)
        truth = cam_like(rng, len(classes), height, width, PHOTO_BLUR_SIGMA)
        save_npz(folder / "predictions" / f"{image_id}.npz", keys=keys, hr_cam=hr_cam)
        save_png(folder / "gt" / f"{image_id}.png", keys[threshold_argmax(truth, GT_THRESHOLD)])
    return ids


def prepare_evaluation(bench: Bench, setup: Setup) -> Callable[[], list]:
    """``evaluate`` (npy mode, 31 thresholds, erosion) of ``bench.batch`` random predictions on ``setup.jobs``."""
    folder = Path(setup.cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-evaluation-")))
    ids = write_evaluation_inputs(folder, bench.batch, bench.size)
    config = EvaluationConfig(pred_dir=folder / "predictions", gt_dir=folder / "gt", mode="npy",
                              thresholds=sweep_thresholds(*EVALUATION_SWEEP), num_classes=NUM_CLASSES)
    return lambda: evaluate(config, ids, setup.jobs)


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


def training_stage(parts: Callable[[Bench, torch.device, bool], TrainingParts]) -> Stage:
    """A training step of the model ``parts`` builds, on ``--device``."""
    return Stage(partial(prepare_training, parts), "images/s", True, TRAINING_AMP, training=True)


STAGES: dict[str, Stage] = {
    "caae": training_stage(caae_parts),
    "semformer": training_stage(semformer_parts),
    "affinitynet": training_stage(affinitynet_parts),
    "deeplab": training_stage(deeplab_parts),
    "cam": Stage(prepare_cam, "images/s", True, CAM_AMP),
    "affinity_label": Stage(prepare_affinity_label, "images/s", False),
    "random_walk": Stage(prepare_random_walk, "s/image", True, size_format="{1}x{0} grid"),
    "pseudo_label": Stage(prepare_pseudo_label, "images/s", False),
    "evaluation": Stage(prepare_evaluation, "s", False, size_format="{0}-{1} px"),
}

TINY_VIT = vit_kwargs("tiny")
TINY_CAAE = dict(**vit_kwargs("tiny", "caae"), decoder_width=64, decoder_depth=1, decoder_heads=2, class_dim=32)
DEIT_S = vit_kwargs("paper")
DEIT_B_DISTILLED = vit_kwargs("paper", "caae")
CAM_SCALES = (0.5, 1.0, 1.5, 2.0)
AFFINITY_RADIUS = 10  # AffinityNet's training pairs, at stride 4
TINY_PHOTO = (90, 120)
VOC_PHOTO = (375, 500)
CONFIGS: dict[str, dict[str, Bench]] = {
    "caae": {"tiny": Bench(16, (64, 64), 3, 1, dict(caae=TINY_CAAE)),
             "paper": Bench(64, (224, 224), 5, 2, dict(caae=DEIT_B_DISTILLED))},
    "semformer": {"tiny": Bench(8, (128, 128), 3, 1, dict(ae_image_size=64, segmentor=TINY_VIT, caae=TINY_CAAE)),
                  "paper": Bench(8, (448, 448), 5, 2, dict(ae_image_size=224, segmentor=DEIT_S,
                                                           caae=DEIT_B_DISTILLED))},
    "affinitynet": {"tiny": Bench(4, (128, 128), 3, 1, dict(backbone="resnet18", radius=AFFINITY_RADIUS)),
                    "paper": Bench(32, (512, 512), 5, 2, dict(backbone="resnet50", radius=AFFINITY_RADIUS))},
    "deeplab": {"tiny": Bench(8, (96, 96), 3, 1,  # the demo's model
                              dict(architecture="deeplabv3plus", backbone="resnet18", bn="train")),
                "paper": Bench(10, (321, 321), 5, 2,
                               dict(architecture="deeplabv2", backbone="resnet101", bn="frozen"))},
    "cam": {"tiny": Bench(1, TINY_PHOTO, 4, 1, dict(segmentor=TINY_VIT, image_size=128, scales=CAM_SCALES,
                                                    cra_layers=1)),
            "paper": Bench(1, VOC_PHOTO, 10, 2, dict(segmentor=DEIT_S, image_size=448, scales=CAM_SCALES,
                                                     cra_layers=4))},
    "affinity_label": {"tiny": Bench(1, TINY_PHOTO, 4, 1), "paper": Bench(1, VOC_PHOTO, 5, 1)},
    "random_walk": {"tiny": Bench(1, (57, 75), 5, 1), "paper": Bench(1, (94, 125), 5, 1)},
    "pseudo_label": {"tiny": Bench(1, TINY_PHOTO, 4, 1), "paper": Bench(1, VOC_PHOTO, 5, 1)},
    "evaluation": {"tiny": Bench(200, (120, 260), 1, 0), "paper": Bench(200, (375, 500), 1, 0)},
}
# The single-stage names of the first version of this script: <training stage>-<size>.
ALIASES = {f"{stage}-{size}": (stage, size) for stage, spec in STAGES.items() if spec.training for size in SIZES}
ALIASES["deeplabv2-paper"] = ("deeplab", "paper")


# ----------------------------------------------------------------------------- one row, in its own process
@dataclass(frozen=True)
class Job:
    """One row: a stage at a size, where and how it runs (``amp`` resolved: off, bf16, fp16 or None for a
    stage without autocast), measured in ``repeats`` fresh processes."""

    stage: str
    config: str
    bench: Bench
    device: str
    amp: str | None
    jobs: int | None
    threads: int | None
    grad_checkpointing: bool
    repeats: int


def peak_rss_mib() -> float:
    """The largest peak resident set size of this process and its finished children, in MiB."""
    peaks = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(peaks) / RSS_UNITS_PER_MIB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_seconds(run: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``steps`` calls of ``run`` after ``warmup`` untimed ones, each synchronised."""
    elapsed = 0.0
    for call in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if call >= warmup:
            elapsed += time.perf_counter() - start
    return elapsed / steps


def silence_output() -> None:
    """Send this process's stdout and stderr (progress bars, library warnings) to the null device."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def measure(job: Job) -> tuple[float, float]:
    """Seconds per call and peak memory (MiB) of ``job``, in this (fresh) process."""
    silence_output()
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(0)
    device = torch.device(job.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_rss_mib()
    with ExitStack() as cleanup:
        setup = Setup(device, job.amp or "off", job.jobs, job.grad_checkpointing, cleanup)
        run = STAGES[job.stage].prepare(job.bench, setup)
        seconds = timed_seconds(run, job.bench.steps, job.bench.warmup, device)
        if device.type == "cuda":
            return seconds, torch.cuda.max_memory_allocated(device) / MIB
        return seconds, peak_rss_mib() - baseline


def fork_server() -> multiprocessing.context.BaseContext:
    """The fork-server context every row's process comes from (the server imports ``PRELOAD_MODULES``)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD_MODULES)
    return context


def measure_in_new_process(job: Job, context: multiprocessing.context.BaseContext) -> tuple[float, float]:
    """``measure(job)`` in a process of its own, forked by the server of ``context``."""
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure, job).result()


def run_job(job: Job, context: multiprocessing.context.BaseContext) -> dict[str, Any]:
    """The row of ``job``: the fastest of its repeats and their largest peak; a failure becomes its note."""
    stage = STAGES[job.stage]
    bench = job.bench
    row = {"stage": job.stage, "config": job.config, "device": job.device, "amp": job.amp, "jobs": job.jobs,
           "batch": bench.batch, "size": stage.size_format.format(*bench.size), "steps": bench.steps,
           "warmup": bench.warmup, "repeats": job.repeats, "unit": stage.unit, "throughput": None,
           "seconds_per_call": None, "seconds_per_call_each": None, "peak_memory_mib": None,
           "memory": "CUDA allocator peak" if job.device.startswith("cuda") else "peak RSS growth", "note": None}
    start = time.perf_counter()
    try:
        runs = [measure_in_new_process(job, context) for _ in range(job.repeats)]
    except BrokenProcessPool:
        row["note"] = "the process died (killed, e.g. out of memory)"
        runs = []
    except Exception as error:  # the stage's own failure, e.g. CUDA out of memory: keep the other rows
        row["note"] = one_line(error)
        runs = []
    row["wall_seconds"] = time.perf_counter() - start
    if runs:
        seconds = min(seconds for seconds, _ in runs)
        row.update(throughput=throughput(stage.unit, bench.batch, seconds), seconds_per_call=seconds,
                   seconds_per_call_each=[seconds for seconds, _ in runs],
                   peak_memory_mib=max(peak for _, peak in runs))
        if stage.training:
            row["iterations_per_s"] = 1.0 / seconds
    return row


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def throughput(unit: str, batch: int, seconds: float) -> float:
    """A call of ``seconds`` over ``batch`` items in ``unit``."""
    if unit == "images/s":
        return batch / seconds
    if unit == "s/image":
        return seconds / batch
    return seconds


# ----------------------------------------------------------------------------- the plan
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StageArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true",
                        help="tiny configs on the CPU, plus paper configs on the GPU if there is one")
    parser.add_argument("--config", choices=(*SIZES, *ALIASES), default=None, metavar="CONFIG",
                        help="tiny (default) or paper for every stage, or <training stage>-<size> for one: "
                             + ", ".join(ALIASES))
    parser.add_argument("--stage", nargs="+", choices=list(STAGES), default=None, metavar="STAGE",
                        help="one or more of " + ", ".join(STAGES) + " (default: all)")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="of the torch stages (default: the CPU for tiny, the GPU if any for paper)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="autocast of the training and CAM stages (default: see above)")
    parser.add_argument("--grad_checkpointing", action="store_true", help="of the ViT training stages")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed calls (default: the config's)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="untimed calls before them (default: the config's)")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="of the training stages")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="evaluation processes (default: a row with 1 and one with every core)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads of every row")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="fresh processes per row; the fastest counts (compare minima on a shared machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {JSON_NAME} and {MARKDOWN_NAME}")
    parser.add_check(lambda args: "--all picks its configs and devices: drop --config and --device"
                     if args.all and (args.config or args.device) else None)
    parser.add_check(lambda args: f"--config {args.config} is a single stage: drop --stage"
                     if args.config in ALIASES and args.stage else None)
    return parser.parse_args(argv)


def targets(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """``(stage, size, device of the torch stages)`` of every (stage, size) to time."""
    gpu = torch.cuda.is_available()
    if args.all:
        stages = args.stage or list(STAGES)
        sizes = [("tiny", "cpu")] + ([("paper", "cuda")] if gpu else [])
        return [(stage, size, device) for size, device in sizes for stage in stages]
    if args.config in ALIASES:
        stage, size = ALIASES[args.config]
        stages = [stage]
    else:
        stages, size = args.stage or list(STAGES), args.config or "tiny"
    device = args.device or ("cuda" if gpu and size == "paper" else "cpu")
    return [(stage, size, device) for stage in stages]


def amp_settings(stage: Stage, args: argparse.Namespace, device: torch.device) -> list[str | None]:
    """The resolved autocast names a stage runs with on ``device`` (None: the stage has no autocast)."""
    if not stage.amp:
        return [None]
    requested = [args.amp] if args.amp else list(stage.amp) if device.type == "cuda" else ["off"]
    return list(dict.fromkeys(AMP_NAMES[resolve_amp(amp, device)] for amp in requested))


def plan(args: argparse.Namespace) -> list[Job]:
    """Every row to measure, in order."""
    jobs = []
    for stage_name, size, torch_device in targets(args):
        stage = STAGES[stage_name]
        bench = CONFIGS[stage_name][size]
        overrides = {"steps": args.steps, "warmup": args.warmup,
                     "batch": args.batch_size if stage.training else None}
        bench = dataclasses.replace(bench, **{name: value for name, value in overrides.items() if value is not None})
        device = torch_device if stage.on_device else "cpu"
        job_counts = [args.jobs] if args.jobs else list(dict.fromkeys((1, default_jobs())))
        for amp in amp_settings(stage, args, torch.device(device)):
            for count in job_counts if stage_name == "evaluation" else [None]:
                jobs.append(Job(stage_name, size, bench, device, amp, count, args.threads, args.grad_checkpointing,
                                args.repeat))
    return jobs


# ----------------------------------------------------------------------------- reporting
def cpu_name() -> str:
    """The CPU model of ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Where and with what the rows are measured."""
    return {
        "command": " ".join(["python -m tools.bench", *argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": package_versions(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": default_jobs(),
        "load_average_before": list(os.getloadavg()),
        "git": git_state(),
    }


def number(value: float | None) -> str:
    """Three significant digits (whole numbers from 1000 up); ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def table_row(row: dict[str, Any]) -> str:
    """One Markdown table line of a row."""
    rate = "-" if row["throughput"] is None else f"{number(row['throughput'])} {row['unit']}"
    if row.get("iterations_per_s") is not None:
        rate += f" ({number(row['iterations_per_s'])} it/s)"
    cells = [row["stage"], row["config"], row["device"], row["amp"] or "-", row["jobs"] or "-", row["batch"],
             row["size"], rate, number(row["seconds_per_call"]), number(row["peak_memory_mib"]), row["note"] or ""]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def loads(averages: list[float]) -> str:
    return " / ".join(f"{average:.2f}" for average in averages)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the setting, the table and the notes."""
    git = report["git"] or {}
    lines = [
        f"# `{report['command']}` ({report['created']})", "",
        f"- CPU: {report['cpu']} ({report['usable_cpus']} of {report['cpu_count']} cores usable, "
        f"{report['torch_threads']} torch threads); GPU: {report['gpu'] or 'none'}",
        "- " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()),
        f"- load average (1, 5, 15 min) before {loads(report['load_average_before'])}, "
        f"after {loads(report['load_average_after'])}",
        f"- git {git.get('commit', 'unknown')}{' (with local changes)' if git.get('dirty') else ''}; "
        f"{report['wall_seconds']:.0f} s for the rows",
        "- memory: CUDA allocator peak on a GPU, growth of the peak resident set size on the CPU", "",
        "| stage | config | device | amp | jobs | batch | size | throughput | s/call | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(table_row(row) for row in report["rows"]),
    ]
    lines += ["", *(f"Note: {note}" for note in report["notes"])] if report["notes"] else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    report = header(args, argv)
    notes = []
    if args.all and not torch.cuda.is_available():
        notes.append("no GPU here: the paper configs were skipped (`--config paper` times them on the CPU)")
    context = fork_server()
    rows = []
    for job in plan(args):
        rows.append(run_job(job, context))
        print(table_row(rows[-1]), flush=True)
    report.update(load_average_after=list(os.getloadavg()), wall_seconds=time.perf_counter() - start,
                  notes=notes, rows=rows)
    atomic_write_text(args.out / JSON_NAME, json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(args.out / MARKDOWN_NAME, text)
    print(f"\n{text}\nwritten: {args.out / JSON_NAME}, {args.out / MARKDOWN_NAME}")
    failed = [row for row in rows if row["note"]]
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(rows)} rows failed (see their notes)")


if __name__ == "__main__":
    run_main(main)

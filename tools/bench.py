"""Training-step benchmark: iterations/s, images/s and peak memory of CAAE, SemFormer and DeepLab steps.

    python -m tools.bench --config tiny                         # CPU here, GPU where there is one
    python -m tools.bench --config semformer-paper --steps 5    # DeiT-S 448 px, batch 8, with a DeiT-B CAAE
    python -m tools.bench --config caae-paper --amp bf16        # DeiT-B distilled 224 px, batch 64
    python -m tools.bench --config deeplabv2-paper --amp off    # ResNet-101 DeepLabV2, 321 px, batch 10

Random inputs, random weights (no download); one forward, backward and SGD step per iteration, the
first ``--warmup`` iterations untimed. Peak memory is the CUDA allocator's peak on a GPU, else the
growth of the process's peak resident set size.
"""
from __future__ import annotations

import argparse
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from core.caae import CAAE
from core.deeplab import DeepLab
from core.losses import LossWeights, caae_loss, segmentation_loss, semformer_loss
from core.semformer import SemFormer, SemFormerSegmentor, ae_inputs
from tools.engine import resolve_amp
from tools.optimizer import build_optimizer, parameter_groups

NUM_CLASSES = 21


@dataclass(frozen=True)
class BenchConfig:
    stage: str
    batch_size: int
    image_size: int
    ae_image_size: int
    semformer_backbone: dict
    caae_backbone: dict
    caae_decoder: dict
    deeplab: dict | None = None  # DeepLab keyword arguments (stage "deeplab")


TINY_VIT = dict(backbone_name="deit_small_patch16_224", backbone_kwargs=dict(depth=2, embed_dim=64, num_heads=2))
CONFIGS = {
    "tiny": BenchConfig("semformer", 8, 128, 64, TINY_VIT, TINY_VIT,
                        dict(decoder_width=64, decoder_depth=1, decoder_heads=2, class_dim=32)),
    "semformer-paper": BenchConfig("semformer", 8, 448, 224, dict(backbone_name="deit_small_patch16_224"),
                                   dict(backbone_name="deit_base_distilled_patch16_224"), {}),
    "caae-paper": BenchConfig("caae", 64, 224, 224, {}, dict(backbone_name="deit_base_distilled_patch16_224"), {}),
    "caae-tiny": BenchConfig("caae", 16, 64, 64, {}, TINY_VIT,
                             dict(decoder_width=64, decoder_depth=1, decoder_heads=2, class_dim=32)),
    "deeplabv2-paper": BenchConfig("deeplab", 10, 321, 0, {}, {}, {},
                                   dict(architecture="deeplabv2", backbone="resnet101", bn="frozen")),
    "deeplab-tiny": BenchConfig("deeplab", 8, 96, 0, {}, {}, {},  # the demo's model
                                dict(architecture="deeplabv3plus", backbone="resnet18", bn="train")),
}


def build(config: BenchConfig, grad_checkpointing: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module to step, module whose parameters train)."""
    if config.stage == "deeplab":
        model = DeepLab(NUM_CLASSES, **config.deeplab)
        return model, model
    caae = CAAE(NUM_CLASSES, image_size=config.ae_image_size, grad_checkpointing=grad_checkpointing,
                **config.caae_backbone, **config.caae_decoder)
    if config.stage == "caae":
        return caae, caae
    class_dim = config.caae_decoder.get("class_dim", 256)
    segmentor = SemFormerSegmentor(NUM_CLASSES, image_size=config.image_size, class_dim=class_dim,
                                   grad_checkpointing=grad_checkpointing, **config.semformer_backbone)
    return SemFormer(segmentor, caae.requires_grad_(False)), segmentor


def random_batch(config: BenchConfig, device: torch.device) -> tuple[torch.Tensor, ...]:
    images = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=device)
    if config.stage == "deeplab":  # a label map of random classes with a few ignored pixels
        masks = torch.randint(0, NUM_CLASSES, images.shape[:1] + images.shape[2:], device=device)
        return images, masks.masked_fill(torch.rand(masks.shape, device=device) < 0.05, 255), None
    labels = (torch.rand(config.batch_size, NUM_CLASSES, device=device) < 0.15).float()
    labels[:, 0] = 1
    size = config.image_size
    boxes = torch.tensor([[0, 0, size, size]] * config.batch_size, device=device)
    return images, labels, boxes


def step_loss(config: BenchConfig, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    images, labels, boxes = batch
    if config.stage == "deeplab":
        logits = torch.nn.functional.interpolate(model(images), size=images.shape[-2:], mode="bilinear",
                                                 align_corners=False)
        return segmentation_loss(logits, labels)["loss"]
    if config.stage == "caae":
        similarity, reconstruction = model(images, labels)
        return caae_loss(similarity, reconstruction, labels, images)["loss"]
    ae_images, grad_masks = ae_inputs(images, boxes, config.ae_image_size)
    return semformer_loss(model(images, ae_images, labels, grad_masks), labels, grad_masks, LossWeights())["loss"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=None, help="override the config's batch")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    if args.batch_size:
        config = BenchConfig(**{**vars(config), "batch_size": args.batch_size})
    device = torch.device(args.device)
    torch.manual_seed(0)
    rss_before = peak_rss_mib()
    model, trained = build(config, args.grad_checkpointing)
    model.to(device).train()
    optimizer = build_optimizer(parameter_groups(trained, 0.01, 5e-4), 0.01, 5e-4)
    dtype = resolve_amp(args.amp, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = random_batch(config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = 0.0
    for iteration in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = step_loss(config, model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if iteration >= args.warmup:
            elapsed += time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_name = "peak CUDA memory"
    else:
        peak = peak_rss_mib() - rss_before
        peak_name = "peak RSS growth"
    result = {"config": args.config, "device": str(device), "amp": str(dtype), "batch_size": config.batch_size,
              "image_size": config.image_size, "iterations_per_s": args.steps / elapsed,
              "images_per_s": args.steps * config.batch_size / elapsed, "peak_memory_mib": peak}
    print(f"{args.config} on {device} (amp {dtype}, batch {config.batch_size}, {config.image_size} px): "
          f"{result['iterations_per_s']:.3f} it/s, {result['images_per_s']:.2f} images/s, "
          f"{peak_name} {peak:.0f} MiB")
    return result


if __name__ == "__main__":
    main()

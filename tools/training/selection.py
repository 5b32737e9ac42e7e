"""Per-epoch checkpoint-selection scores of the training scripts, as the original computes them.

- CAAE: mean average precision of the binarised class similarities, best over 99 thresholds.
- SemFormer: CAM mIoU at the patch grid (28 x 28 for 448 px), best over 99 background thresholds.
Both run on the ``train`` list with its ground truth (``--select_by gt``, the original's protocol).
- DeepLab: single-scale mIoU on the ``val`` list, logged every epoch when val ground truth exists
  (``--select_by val`` keeps the best, which tunes on val; the default keeps the last).

Each shows a ``validation`` progress bar (rank 0 runs them; the bar goes once the pass ends): at paper size
a pass takes about 20 minutes on a CPU.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.losses import cosine_similarity
from tools.scoring.metrics import ConfusionAccumulator

SELECTION_THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)  # 0.01 .. 0.99, the original's 99 values
CAM_EPSILON = 1e-5


def progress(loader: DataLoader) -> tqdm:
    """The batches of an evaluation pass behind the ``validation`` bar, which goes when the pass ends."""
    return tqdm(loader, desc="validation", leave=False, dynamic_ncols=True)


def binary_average_precision(predicted: Tensor, target: Tensor) -> Tensor:
    """Average precision (sklearn's definition) of 0/1 predictions ``(..., K)`` against 0/1 targets.

    With only two score values the precision-recall curve has at most two points: the predicted
    positives (recall TP/P, precision TP/N_pred) and everything (recall 1, precision P/K).
    Rows without a positive target give 0.
    """
    predicted, target = predicted.float(), target.float()
    num_classes = target.shape[-1]
    positives = target.sum(-1)
    true_positives = (predicted * target).sum(-1)
    num_predicted = predicted.sum(-1)
    base_precision = positives / num_classes
    recall = true_positives / positives.clamp(min=1)
    precision = true_positives / num_predicted.clamp(min=1)
    two_points = recall * precision + (1 - recall) * base_precision
    one_point = (num_predicted == 0) | (num_predicted == num_classes)
    average_precision = torch.where(one_point, base_precision, two_points)
    return torch.where(positives > 0, average_precision, torch.zeros_like(average_precision))


@torch.no_grad()
def caae_selection_score(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """Best mAP (x100) over the thresholds of ``cos(cre, crs) > th`` per image, over all K classes."""
    totals = torch.zeros(len(SELECTION_THRESHOLDS), dtype=torch.float64)
    count = 0
    levels = torch.as_tensor(SELECTION_THRESHOLDS, dtype=torch.float32)
    for images, labels, _ in progress(loader):
        images = images.to(device)
        labels = torch.cat([torch.ones(len(labels), 1), labels], dim=1)
        similarity = cosine_similarity(model.get_cre(images), model.get_crs(len(images))).float().cpu()
        predicted = similarity[None] > levels[:, None, None]
        totals += binary_average_precision(predicted, labels[None].expand_as(predicted)).sum(-1).double()
        count += len(images)
    scores = 100.0 * totals / max(count, 1)
    best = int(scores.argmax())
    return {"score": float(scores[best]), "mAP": float(scores[best]), "threshold": float(SELECTION_THRESHOLDS[best])}


def make_cam(seg_logits: Tensor, labels: Tensor) -> Tensor:
    """Foreground CAMs ``(B, K-1, h, w)``: ReLU, shift by 1e-5, divide by the spatial max, mask by labels."""
    cams = F.relu(seg_logits[:, 1:].float())
    cams = F.relu(cams - CAM_EPSILON) / (cams.amax(dim=(2, 3), keepdim=True) + CAM_EPSILON)
    return cams * labels[:, :, None, None]


@torch.no_grad()
def semformer_selection_score(
    segmentor: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
    on_batch: Callable[[int, Tensor, Tensor], None] | None = None,
) -> dict:
    """Best CAM mIoU over background thresholds, with the GT masks sampled down to the patch grid.

    ``on_batch(index, images, cams)`` lets the caller log CAM overlays.
    """
    accumulator = ConfusionAccumulator(num_classes, len(SELECTION_THRESHOLDS))
    levels = torch.as_tensor(SELECTION_THRESHOLDS, dtype=torch.float32)[:, None, None, None]
    for index, (images, labels, masks) in enumerate(progress(loader)):
        cams = make_cam(segmentor(images.to(device)), labels.to(device)).cpu()
        if on_batch is not None:
            on_batch(index, images, cams)
        grid = cams.shape[-2:]
        masks = F.interpolate(masks[:, None].float(), size=grid, mode="nearest")[:, 0].long().numpy()
        best, best_index = cams.max(dim=1)
        predictions = torch.where(best[None] > levels, best_index[None] + 1, 0).numpy()
        for image_index in range(len(images)):
            accumulator.update(masks[image_index], predictions[:, image_index])
    scores = accumulator.scores()
    mious = [score.miou for score in scores]
    best = int(np.argmax(mious))
    return {"score": mious[best], "mIoU": mious[best], "threshold": float(SELECTION_THRESHOLDS[best]),
            "FP": scores[best].fp_all, "FN": scores[best].fn_all}


@torch.no_grad()
def segmentation_selection_score(model: nn.Module, loader: DataLoader, num_classes: int,
                                 device: torch.device) -> dict:
    """Single-scale mIoU of a segmentation model on whole images (batches of 1, any size).

    ``loader`` yields ``(image (1, 3, H, W), label, mask (1, H, W))`` (``CAMTestDataset`` with
    ``segmentation_eval_transform``); logits are resized to the mask (bilinear) and arg-maxed.
    """
    accumulator = ConfusionAccumulator(num_classes)
    for images, _, masks in progress(loader):
        logits = model(images.to(device))
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        predictions = logits.argmax(1).cpu().numpy()
        for mask, prediction in zip(masks.numpy(), predictions):
            accumulator.update(mask, prediction)
    scores = accumulator.scores()[0]
    return {"score": scores.miou, "mIoU": scores.miou, "FP": scores.fp_all, "FN": scores.fn_all}

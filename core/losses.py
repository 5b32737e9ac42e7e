"""Losses of the CAAE, SemFormer and segmentation stages (docs/method.md §2.1, §2.2, §2.4).

Every loss is vectorised over images and classes, reads the class count ``K`` from its inputs and
computes in float32, so it is safe to call on half-precision outputs under ``torch.autocast``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from core.conventions import IGNORE_INDEX

COSINE_NORM_EPS = 1e-8
COSINE_CLAMP_MARGIN = 1e-4


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dim, clamped to ``[-1 + 1e-4, 1 - 1e-4]``.

    The clamp keeps ``binary_cross_entropy`` on the raw cosine away from ``log(0)``.
    ``a`` and ``b`` broadcast against each other, e.g. ``(B, K, D)`` with ``(B, K, D)`` gives ``(B, K)``.
    Computed in float32: in float16 the upper clamp ``1 - 1e-4`` would round to exactly 1.
    """
    a = F.normalize(a.float(), dim=-1, eps=COSINE_NORM_EPS)
    b = F.normalize(b.float(), dim=-1, eps=COSINE_NORM_EPS)
    similarity = (a * b).sum(dim=-1)
    return similarity.clamp(-1.0 + COSINE_CLAMP_MARGIN, 1.0 - COSINE_CLAMP_MARGIN)


class SeenPairs(NamedTuple):
    """The present (image, class) pairs of a batch and the classes each pair is pulled to / pushed from.

    ``batch_index`` and ``class_index`` are ``(S,)`` long tensors in row-major order over ``labels``;
    ``pull`` and ``push`` are ``(S, K)`` bool masks.
    """

    batch_index: Tensor
    class_index: Tensor
    pull: Tensor
    push: Tensor


def seen_pairs(labels: Tensor) -> SeenPairs:
    """Enumerate the pairs ``(b, c)`` with ``labels[b, c] > 0`` (background column included).

    ``pull[s]`` is the one-hot of the pair's own class; ``push[s]`` marks the other classes present
    in the same image (background among them whenever the pair's class is a foreground class).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, K), got {tuple(labels.shape)}")
    present = labels > 0
    batch_index, class_index = present.nonzero(as_tuple=True)
    num_classes = labels.shape[1]
    pull = F.one_hot(class_index, num_classes).bool()
    push = present[batch_index] & ~pull
    return SeenPairs(batch_index, class_index, pull, push)


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def _check_masks(masks: Tensor) -> None:
    if masks.dim() != 4 or masks.shape[1] < 2:
        raise ValueError(
            f"masks must have shape (B, K, h, w) with K >= 2 (background and at least one class), "
            f"got {tuple(masks.shape)}"
        )


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, or 0 where the denominator is 0."""
    safe_denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe_denominator, torch.zeros_like(numerator))


def binary_cross_entropy(probabilities: Tensor, labels: Tensor) -> Tensor:
    """Mean ``F.binary_cross_entropy`` of probabilities (no sigmoid) against labels of the same shape.

    Runs in float32 with autocast disabled: CUDA autocast refuses ``binary_cross_entropy`` on
    half-precision inputs. PyTorch clamps the log terms at -100, so probabilities of exactly 0 or 1
    stay finite.
    """
    _check_shape("labels", labels, tuple(probabilities.shape))
    with torch.autocast(device_type=probabilities.device.type, enabled=False):
        return F.binary_cross_entropy(probabilities.float(), labels.float())


def caae_loss(
    sim: Tensor,
    recon: Tensor,
    labels: Tensor,
    images_normalised: Tensor,
    bce_weight: float = 1.0,
    mse_weight: float = 1.0,
) -> dict[str, Tensor]:
    """CAAE objective: BCE of the class similarities plus MSE of the reconstruction.

    ``sim (B, K)`` are raw cosines, ``labels (B, K)`` include background, ``recon`` and
    ``images_normalised`` are ``(B, 3, H, W)`` (the target is the mean/std-normalised input).
    Returns ``loss``, ``bce`` and ``mse``.
    """
    _check_shape("images_normalised", images_normalised, tuple(recon.shape))
    bce = binary_cross_entropy(sim, labels)
    mse = F.mse_loss(recon.float(), images_normalised.float())
    return {"loss": bce_weight * bce + mse_weight * mse, "bce": bce, "mse": mse}


def seg_sim_loss(seg_sim: Tensor, labels: Tensor) -> Tensor:
    """BCE between the segmentor's class similarities ``(B, K)`` and the labels ``(B, K)``."""
    return binary_cross_entropy(seg_sim, labels)


def nanmean(values: Tensor) -> Tensor:
    """Mean of the non-NaN entries of ``values`` (float32), or 0 if there are none."""
    values = values.float()
    finite = ~torch.isnan(values)
    total = torch.where(finite, values, torch.zeros_like(values)).sum()
    return _safe_divide(total, finite.sum().float())


def class_loss(pull_sim: Tensor, push_sim: Tensor) -> Tensor:
    """``[(1 - nanmean(pull)) + (1 + nanmean(push))] / 2`` over the ``(P,)`` and ``(Q,)`` similarities.

    An empty (or all-NaN) vector contributes its constant 1 and no gradient.
    """
    return ((1.0 - nanmean(pull_sim)) + (1.0 + nanmean(push_sim))) / 2.0


def activation_suppression(
    masks: Tensor, labels: Tensor | None = None, valid: Tensor | None = None
) -> Tensor:
    """Push foreground activations down and the background activation up.

    By default this is the original term ``mean(masks[:, 1:]) + (1 - mean(masks[:, 0]))`` over every
    pixel of ``masks (B, K, h, w)``, absent classes and zero padding included (so padding counts as
    fully missed background). With ``valid (B, 1, h, w)`` and ``labels (B, K)`` it averages the
    foreground term only over valid pixels of present foreground classes and the background term only
    over valid pixels; an empty average contributes 0.
    """
    _check_masks(masks)
    masks = masks.float()
    if valid is None:
        return masks[:, 1:].mean() + (1.0 - masks[:, 0].mean())
    if labels is None:
        raise ValueError("activation_suppression needs labels (B, K) when valid is given")
    batch, num_classes = masks.shape[:2]
    _check_shape("labels", labels, (batch, num_classes))
    _check_shape("valid", valid, (batch, 1, *masks.shape[2:]))
    valid = (valid > 0).float()
    present_foreground = (labels[:, 1:] > 0).float()[:, :, None, None]
    foreground_weight = present_foreground * valid
    foreground = _safe_divide((masks[:, 1:] * foreground_weight).sum(), foreground_weight.sum())
    background = _safe_divide(((1.0 - masks[:, :1]) * valid).sum(), valid.sum())
    return foreground + background


def activation_completion(masks: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Make each present class and its strongest present rival add up to 1 on every valid pixel.

    Sums ``(m_c + max_{c' present, c' != c} m_c' - 1)^2`` over valid pixels of every present class
    ``c`` (background included) of an image with at least two present classes, and divides by the sum
    of ``|valid(b)|`` over those (b, c) pairs; 0 when nothing is counted. ``masks (B, K, h, w)``,
    ``labels (B, K)``, ``valid (B, 1, h, w)`` (pixels where it is > 0).
    """
    _check_masks(masks)
    batch, num_classes = masks.shape[:2]
    _check_shape("labels", labels, (batch, num_classes))
    _check_shape("valid", valid, (batch, 1, *masks.shape[2:]))
    masks = masks.float()
    present = labels > 0
    counted = present & (present.sum(dim=1, keepdim=True) >= 2)

    # The strongest other present class is the top present class, unless that is c itself.
    present_only = masks.masked_fill(~present[:, :, None, None], float("-inf"))
    top_values, top_indices = present_only.topk(2, dim=1)
    class_ids = torch.arange(num_classes, device=masks.device)[None, :, None, None]
    strongest_other = torch.where(top_indices[:, :1] == class_ids, top_values[:, 1:], top_values[:, :1])
    strongest_other = strongest_other.masked_fill(~counted[:, :, None, None], 0.0)

    pixel_weight = counted[:, :, None, None].float() * (valid > 0).float()
    squared_error = (masks + strongest_other - 1.0) ** 2
    total = (squared_error * pixel_weight).sum()
    return _safe_divide(total, pixel_weight.sum())


@dataclass(frozen=True)
class LossWeights:
    """Weights of the SemFormer loss terms (paper defaults)."""

    seg_sim: float = 1.0
    cls_fg: float = 1.0
    cls_bg: float = 1.0
    act_supp: float = 0.075
    act_cplt: float = 1.0


def semformer_loss(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    grad_masks: Tensor,
    weights: LossWeights = LossWeights(),
    masked_suppression: bool = False,
) -> dict[str, Tensor]:
    """All SemFormer loss terms and their weighted sum ``loss``.

    ``outputs`` is ``SemFormer.forward_train``'s dict: ``masks (B, K, h, w)``, ``seg_sim (B, K)`` and
    the similarity vectors ``fg_pull``, ``fg_push``, ``bg_pull``, ``bg_push``. ``labels (B, K)``
    include background; ``grad_masks (B, 1, h, w)`` mark the non-padded pixels. ``masked_suppression``
    averages the suppression term over valid pixels and present classes instead of everything.
    Returns ``loss`` and one entry per field of ``LossWeights``.
    """
    masks = outputs["masks"]
    terms = {
        "seg_sim": seg_sim_loss(outputs["seg_sim"], labels),
        "cls_fg": class_loss(outputs["fg_pull"], outputs["fg_push"]),
        "cls_bg": class_loss(outputs["bg_pull"], outputs["bg_push"]),
        "act_supp": (
            activation_suppression(masks, labels, grad_masks)
            if masked_suppression
            else activation_suppression(masks)
        ),
        "act_cplt": activation_completion(masks, labels, grad_masks),
    }
    loss = sum(getattr(weights, field.name) * terms[field.name] for field in fields(LossWeights))
    return {"loss": loss, **terms}


# ----------------------------------------------------------------------------- segmentation stage
SEGMENTATION_LOSSES = ("balanced_ce", "ce")


def segmentation_loss(
    logits: Tensor, labels: Tensor, kind: str = "balanced_ce", ignore_index: int = IGNORE_INDEX
) -> dict[str, Tensor]:
    """Cross-entropy of DeepLab logits ``(B, K, H, W)`` against labels ``(B, H, W)`` (``ignore_index`` skipped).

    ``ce``: the mean over all labelled pixels. ``balanced_ce``: the mean of the background pixels'
    mean CE and the foreground pixels' mean CE, so a batch that is mostly background does not drown
    the objects; when a batch has only one of the two kinds, that kind's mean. A batch without any
    labelled pixel gives 0 with zero gradient (PyTorch's mean CE would be NaN). Returns ``loss`` and
    the two means ``bg_ce`` and ``fg_ce`` (0 when absent), all in float32.
    """
    if kind not in SEGMENTATION_LOSSES:
        raise ValueError(f"--loss must be one of {SEGMENTATION_LOSSES}, got {kind!r}")
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (B, K, H, W) {tuple(logits.shape)} and labels (B, H, W) {tuple(labels.shape)} "
                         "do not match")
    pixel_loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    background = labels == 0
    foreground = (labels != 0) & (labels != ignore_index)
    sums = torch.stack([pixel_loss[background].sum(), pixel_loss[foreground].sum()])
    counts = torch.stack([background.sum(), foreground.sum()]).to(sums.dtype)
    means = _safe_divide(sums, counts)
    if kind == "ce":
        loss = _safe_divide(sums.sum(), counts.sum())
    else:
        present = (counts > 0).to(sums.dtype)
        loss = _safe_divide((means * present).sum(), present.sum())
    return {"loss": loss, "bg_ce": means[0], "fg_ce": means[1]}

"""Tests of core/losses.py against slow loop references written from docs/method.md §2.1 and §2.2."""

import math

import pytest
import torch

from core.losses import (LossWeights, activation_completion, activation_suppression, caae_loss, class_loss,
                         cosine_similarity, nanmean, seen_pairs, seg_sim_loss, semformer_loss)

TOLERANCE = 1e-6
LOG_CLAMP = -100.0


# ----------------------------------------------------------------------------- references


def reference_bce(probabilities, labels):
    total = 0.0
    flat_p, flat_y = probabilities.flatten().tolist(), labels.flatten().tolist()
    for p, y in zip(flat_p, flat_y):
        log_p = max(math.log(p), LOG_CLAMP) if p > 0 else LOG_CLAMP
        log_not_p = max(math.log(1 - p), LOG_CLAMP) if p < 1 else LOG_CLAMP
        total += -(y * log_p + (1 - y) * log_not_p)
    return total / len(flat_p)


def reference_nanmean(values):
    kept = [v for v in values.tolist() if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else 0.0


def reference_class_loss(pull_sim, push_sim):
    return ((1 - reference_nanmean(pull_sim)) + (1 + reference_nanmean(push_sim))) / 2


def reference_suppression(masks):
    batch, num_classes, height, width = masks.shape
    foreground, background = 0.0, 0.0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                background += float(masks[b, 0, y, x])
                for c in range(1, num_classes):
                    foreground += float(masks[b, c, y, x])
    pixels = batch * height * width
    return foreground / (pixels * (num_classes - 1)) + (1 - background / pixels)


def reference_masked_suppression(masks, labels, valid):
    batch, num_classes, height, width = masks.shape
    fg_sum, fg_count, bg_sum, bg_count = 0.0, 0, 0.0, 0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if valid[b, 0, y, x] <= 0:
                    continue
                bg_sum += 1 - float(masks[b, 0, y, x])
                bg_count += 1
                for c in range(1, num_classes):
                    if labels[b, c] > 0:
                        fg_sum += float(masks[b, c, y, x])
                        fg_count += 1
    return (fg_sum / fg_count if fg_count else 0.0) + (bg_sum / bg_count if bg_count else 0.0)


def reference_completion(masks, labels, valid):
    """Literal loop of the activation-completion formula (docs/method.md §2.2); returns a tensor so gradients can be compared too."""
    batch = masks.shape[0]
    total = masks.new_zeros(())
    normaliser = 0.0
    for b in range(batch):
        present = [c for c in range(labels.shape[1]) if labels[b, c] > 0]
        valid_pixels = valid[b, 0] > 0
        for c in present:
            others = [o for o in present if o != c]
            if not others:
                continue
            normaliser += float(valid[b].sum())
            strongest = masks[b, others].max(dim=0).values
            total = total + ((masks[b, c] + strongest - 1) ** 2)[valid_pixels].sum()
    if normaliser == 0:
        return masks.new_zeros(())
    return total / normaliser


def random_masks(batch, num_classes, size, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, num_classes, *size, generator=generator, dtype=torch.float32)
    return masks.requires_grad_(requires_grad)


def padded_valid(batch, size, extents):
    """``valid (B, 1, h, w)`` with the top-left ``extents[b] = (rows, cols)`` marked valid."""
    valid = torch.zeros(batch, 1, *size)
    for b, (rows, cols) in enumerate(extents):
        valid[b, 0, :rows, :cols] = 1
    return valid


# Image 0: background + classes 2 and 4; image 1: background only; image 2: background + class 1;
# image 3: one foreground class and no background; image 4: nothing present.
EDGE_LABELS = torch.tensor(
    [
        [1, 0, 1, 0, 1, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.float32,
)


# ----------------------------------------------------------------------------- cosine / pairs


def test_cosine_similarity_matches_formula_and_clamps():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 7, generator=generator)
    b = torch.randn(3, 5, 7, generator=generator)
    expected = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(cosine_similarity(a, b), expected, atol=TOLERANCE, rtol=0)

    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert cosine_similarity(v, 5 * v).item() == pytest.approx(1 - 1e-4, abs=1e-7)
    assert cosine_similarity(v, -v).item() == pytest.approx(-1 + 1e-4, abs=1e-7)
    assert cosine_similarity(v, torch.zeros_like(v)).item() == 0.0


def test_cosine_similarity_half_inputs_keep_the_clamp():
    v = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.float16)
    similarity = cosine_similarity(v, v)
    assert similarity.dtype == torch.float32
    assert similarity.item() < 1.0


def test_seen_pairs_exact_indices():
    labels = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    pairs = seen_pairs(labels)
    assert pairs.batch_index.tolist() == [0, 0, 0, 1, 2, 2]
    assert pairs.class_index.tolist() == [0, 2, 3, 0, 0, 1]
    assert pairs.batch_index.dtype == pairs.class_index.dtype == torch.long
    assert pairs.pull.dtype == pairs.push.dtype == torch.bool
    assert pairs.pull.int().tolist() == [
        [1, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
    ]
    assert pairs.push.int().tolist() == [
        [0, 0, 1, 1],
        [1, 0, 0, 1],
        [1, 0, 1, 0],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
        [1, 0, 0, 0],
    ]


def test_seen_pairs_rejects_wrong_rank():
    with pytest.raises(ValueError, match="labels"):
        seen_pairs(torch.ones(2, 3, 4))


# ----------------------------------------------------------------------------- BCE-based losses


def test_caae_loss_matches_reference():
    generator = torch.Generator().manual_seed(1)
    sim = torch.rand(3, 6, generator=generator)
    sim[0, 0] = 0.0  # an all-zero ReLU vector on a present class: log clamped at -100
    labels = (torch.rand(3, 6, generator=generator) > 0.5).float()
    labels[:, 0] = 1
    recon = torch.randn(3, 3, 4, 5, generator=generator)
    images = torch.randn(3, 3, 4, 5, generator=generator)

    result = caae_loss(sim, recon, labels, images, bce_weight=0.5, mse_weight=2.0)
    expected_bce = reference_bce(sim, labels)
    differences = (recon - images).flatten().tolist()
    expected_mse = sum(d * d for d in differences) / len(differences)
    assert result["bce"].item() == pytest.approx(expected_bce, abs=1e-5)
    assert result["mse"].item() == pytest.approx(expected_mse, abs=TOLERANCE)
    assert result["loss"].item() == pytest.approx(0.5 * expected_bce + 2.0 * expected_mse, abs=1e-5)


def test_caae_loss_rejects_mismatched_target():
    with pytest.raises(ValueError, match="images_normalised"):
        caae_loss(torch.rand(2, 4), torch.rand(2, 3, 8, 8), torch.ones(2, 4), torch.rand(2, 3, 4, 4))


def test_seg_sim_loss_matches_reference():
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.rand(2, 4, 7, 5, generator=generator)
    seg_sim = cosine_similarity(embeddings[0], embeddings[1])
    labels = (torch.rand(4, 7, generator=generator) > 0.6).float()
    expected = reference_bce(seg_sim, labels)
    assert seg_sim_loss(seg_sim, labels).item() == pytest.approx(expected, abs=TOLERANCE)
    with pytest.raises(ValueError, match="labels"):
        seg_sim_loss(seg_sim, labels[:, 1:])


# ----------------------------------------------------------------------------- class loss


@pytest.mark.parametrize(
    "pull, push",
    [
        ([0.9, 0.7, 0.8], [0.1, 0.3]),
        ([0.9, float("nan"), 0.5], [float("nan"), 0.2]),
        ([float("nan"), float("nan")], [0.4]),
        ([0.6], []),
        ([], []),
    ],
)
def test_class_loss_matches_reference(pull, push):
    pull_sim, push_sim = torch.tensor(pull), torch.tensor(push)
    expected = reference_class_loss(pull_sim, push_sim)
    assert class_loss(pull_sim, push_sim).item() == pytest.approx(expected, abs=TOLERANCE)


def test_nanmean_ignores_nan_in_value_and_gradient():
    values = torch.tensor([0.2, float("nan"), 0.6], requires_grad=True)
    result = nanmean(values)
    result.backward()
    assert result.item() == pytest.approx(0.4, abs=TOLERANCE)
    assert values.grad.tolist() == pytest.approx([0.5, 0.0, 0.5])


# ----------------------------------------------------------------------------- activation losses


def test_activation_suppression_counts_everything_by_default():
    masks = random_masks(3, 5, (4, 6), seed=3)
    masks[1, :, 2:] = 0  # padding: counts as missed background in the original
    expected = reference_suppression(masks)
    assert activation_suppression(masks).item() == pytest.approx(expected, abs=TOLERANCE)
    labels = torch.zeros(3, 5)
    assert activation_suppression(masks, labels).item() == pytest.approx(expected, abs=TOLERANCE)


def test_activation_suppression_masked_variant():
    masks = random_masks(5, 6, (4, 5), seed=4)
    valid = padded_valid(5, (4, 5), [(4, 5), (2, 3), (0, 0), (4, 1), (3, 5)])
    masks = masks * valid
    expected = reference_masked_suppression(masks, EDGE_LABELS, valid)
    result = activation_suppression(masks, EDGE_LABELS, valid)
    assert result.item() == pytest.approx(expected, abs=TOLERANCE)
    assert result.item() != pytest.approx(activation_suppression(masks).item(), abs=1e-3)


def test_activation_suppression_masked_variant_without_valid_pixels_is_zero():
    masks = random_masks(2, 3, (3, 3), seed=5)
    labels = torch.ones(2, 3)
    assert activation_suppression(masks, labels, torch.zeros(2, 1, 3, 3)).item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        activation_suppression(masks, valid=torch.ones(2, 1, 3, 3))


def test_activation_completion_matches_reference_on_edge_cases():
    masks = random_masks(5, 6, (4, 5), seed=6)
    valid = padded_valid(5, (4, 5), [(3, 4), (4, 5), (4, 5), (4, 5), (4, 5)])
    masks = masks * valid
    expected = reference_completion(masks, EDGE_LABELS, valid)
    # Only image 0 (three present classes) and image 2 (two) have completion pairs.
    assert expected.item() > 0
    result = activation_completion(masks, EDGE_LABELS, valid)
    assert result.item() == pytest.approx(expected.item(), abs=TOLERANCE)


def test_activation_completion_ties_at_the_maximum():
    masks = random_masks(2, 5, (3, 4), seed=7)
    labels = torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 0]], dtype=torch.float32)
    masks[0, 1] = masks[0, 2]  # classes 1 and 2 tie everywhere
    masks[0, 4, :, :2] = masks[0, 1, :, :2]  # three-way tie on part of the image
    masks[1, 0] = 0.7
    masks[1, 2] = 0.7  # background ties with a class
    masks[1, 3] = 0.7
    valid = torch.ones(2, 1, 3, 4)
    expected = reference_completion(masks, labels, valid)
    assert activation_completion(masks, labels, valid).item() == pytest.approx(expected.item(), abs=TOLERANCE)


def test_activation_completion_fully_padded_image_and_empty_normaliser():
    masks = random_masks(3, 4, (3, 3), seed=8)
    labels = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    valid = padded_valid(3, (3, 3), [(3, 3), (0, 0), (2, 2)])
    masks = masks * valid
    expected = reference_completion(masks, labels, valid)
    assert activation_completion(masks, labels, valid).item() == pytest.approx(expected.item(), abs=TOLERANCE)

    background_only = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    assert activation_completion(masks, background_only, valid).item() == 0.0
    assert activation_completion(masks, labels, torch.zeros(3, 1, 3, 3)).item() == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_activation_completion_random_batches_value_and_gradient(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    batch, num_classes, size = 4, 7, (6, 5)
    labels = (torch.rand(batch, num_classes, generator=generator) > 0.6).float()
    labels[:, 0] = 1
    valid = padded_valid(batch, size, [(6, 5), (4, 5), (6, 2), (1, 1)])
    masks = random_masks(batch, num_classes, size, seed=200 + seed, requires_grad=True)

    result = activation_completion(masks * valid, labels, valid)
    (gradient,) = torch.autograd.grad(result, masks)
    expected = reference_completion(masks * valid, labels, valid)
    (expected_gradient,) = torch.autograd.grad(expected, masks, allow_unused=True)
    if expected_gradient is None:
        expected_gradient = torch.zeros_like(masks)
    assert result.item() == pytest.approx(expected.item(), abs=TOLERANCE)
    torch.testing.assert_close(gradient, expected_gradient, atol=TOLERANCE, rtol=0)


def test_activation_losses_reject_bad_shapes():
    masks = torch.rand(2, 4, 3, 3)
    with pytest.raises(ValueError, match="valid"):
        activation_completion(masks, torch.ones(2, 4), torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="labels"):
        activation_completion(masks, torch.ones(2, 5), torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="masks"):
        activation_suppression(torch.rand(2, 1, 3, 3))


# ----------------------------------------------------------------------------- total loss


def semformer_outputs(seed, labels, size=(4, 4), requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    batch, num_classes = labels.shape
    pairs = seen_pairs(labels)

    def similarities(count):
        return torch.rand(count, generator=generator).requires_grad_(requires_grad)

    return {
        "masks": random_masks(batch, num_classes, size, seed=seed, requires_grad=requires_grad),
        "seg_sim": (0.01 + 0.98 * torch.rand(batch, num_classes, generator=generator)).requires_grad_(
            requires_grad
        ),
        "fg_pull": similarities(int(pairs.pull.sum())),
        "fg_push": similarities(int(pairs.push.sum())),
        "bg_pull": similarities(int(pairs.push.sum())),
        "bg_push": similarities(int(pairs.pull.sum())),
    }


def test_semformer_loss_weights_each_term():
    labels = EDGE_LABELS
    outputs = semformer_outputs(9, labels)
    grad_masks = padded_valid(5, (4, 4), [(4, 4), (2, 4), (4, 3), (0, 0), (4, 4)])
    weights = LossWeights(seg_sim=0.5, cls_fg=2.0, cls_bg=3.0, act_supp=0.25, act_cplt=4.0)
    result = semformer_loss(outputs, labels, grad_masks, weights)

    masks = outputs["masks"]
    expected_terms = {
        "seg_sim": reference_bce(outputs["seg_sim"].detach(), labels),
        "cls_fg": reference_class_loss(outputs["fg_pull"], outputs["fg_push"]),
        "cls_bg": reference_class_loss(outputs["bg_pull"], outputs["bg_push"]),
        "act_supp": reference_suppression(masks.detach()),
        "act_cplt": reference_completion(masks.detach(), labels, grad_masks).item(),
    }
    for name, value in expected_terms.items():
        assert result[name].item() == pytest.approx(value, abs=1e-5), name
    expected_total = sum(getattr(weights, name) * value for name, value in expected_terms.items())
    assert result["loss"].item() == pytest.approx(expected_total, abs=1e-5)

    masked = semformer_loss(outputs, labels, grad_masks, weights, masked_suppression=True)
    expected_masked = reference_masked_suppression(masks.detach(), labels, grad_masks)
    assert masked["act_supp"].item() == pytest.approx(expected_masked, abs=TOLERANCE)


def test_default_weights_are_the_paper_setting():
    assert LossWeights() == LossWeights(seg_sim=1.0, cls_fg=1.0, cls_bg=1.0, act_supp=0.075, act_cplt=1.0)


@pytest.mark.parametrize(
    "labels",
    [
        EDGE_LABELS,
        torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.float32),  # background only: push vectors empty
        torch.tensor([[1, 1, 1], [1, 1, 1]], dtype=torch.float32),
    ],
)
@pytest.mark.parametrize("masked_suppression", [False, True])
def test_semformer_loss_gradients_are_finite(labels, masked_suppression):
    outputs = semformer_outputs(10, labels)
    outputs["masks"].data[0, :2] = 0.5  # a tie between background and class 1 on image 0
    batch = labels.shape[0]
    grad_masks = padded_valid(batch, (4, 4), [(4, 4)] + [(0, 0)] * (batch - 1))
    result = semformer_loss(outputs, labels, grad_masks, masked_suppression=masked_suppression)
    result["loss"].backward()
    assert torch.isfinite(result["loss"])
    for name, tensor in outputs.items():
        assert tensor.grad is not None, name
        assert torch.isfinite(tensor.grad).all(), name
    assert outputs["masks"].grad.abs().sum() > 0
    assert outputs["seg_sim"].grad.abs().sum() > 0


def test_caae_loss_gradients_are_finite():
    sim = torch.tensor([[0.0, 0.3, 0.9999], [0.5, 0.0, 0.2]], requires_grad=True)
    recon = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    result = caae_loss(sim, recon, labels, torch.randn(2, 3, 4, 4))
    result["loss"].backward()
    assert torch.isfinite(sim.grad).all() and torch.isfinite(recon.grad).all()


def test_losses_run_in_float32_under_autocast():
    labels = EDGE_LABELS
    outputs = semformer_outputs(11, labels, requires_grad=False)
    grad_masks = torch.ones(5, 1, 4, 4)
    expected = semformer_loss(
        {name: tensor.bfloat16().float() for name, tensor in outputs.items()}, labels, grad_masks
    )
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        half_outputs = {name: tensor.bfloat16() for name, tensor in outputs.items()}
        result = semformer_loss(half_outputs, labels, grad_masks)
        recon, target = torch.rand(5, 3, 4, 4).bfloat16(), torch.rand(5, 3, 4, 4)
        caae = caae_loss(half_outputs["seg_sim"], recon, labels, target)
    for name, value in expected.items():
        assert result[name].dtype == torch.float32, name
        torch.testing.assert_close(result[name], value, atol=TOLERANCE, rtol=0)
    assert all(value.dtype == torch.float32 for value in caae.values())

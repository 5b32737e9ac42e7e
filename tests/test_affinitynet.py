"""AffinityNet: shapes, frozen backbone, weight loading, edge-map inference and the affinity loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from core.affinitynet import AffinityNet, affinity_loss
from core.checkpoint import CheckpointError
from core.path_index import PathIndex, affinity_targets


@pytest.fixture(scope="module")
def resnet18_net() -> AffinityNet:
    torch.manual_seed(0)
    return AffinityNet("resnet18").eval()


def test_output_shapes_on_a_non_square_input(resnet18_net):
    logits = resnet18_net(torch.randn(2, 3, 100, 72))
    assert logits.shape == (2, 1, 25, 18)
    model = AffinityNet("resnet18", path_index=PathIndex(5, (25, 18)))
    aff = model.affinity(logits)
    assert aff.shape == (2, 34, (25 - 4) * (18 - 8))
    assert ((aff >= 0) & (aff <= 1)).all()
    with pytest.raises(ValueError, match="does not match"):
        model.affinity(torch.randn(1, 1, 24, 18))
    with pytest.raises(RuntimeError, match="path_index"):
        resnet18_net.affinity(logits)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_layer4_has_stride_one_and_no_dilation(backbone):
    model = AffinityNet(backbone)
    x = torch.randn(1, 3, 64, 96)
    sizes = []
    for stage in model.stages:
        x = stage(x)
        sizes.append(tuple(x.shape[-2:]))
    assert sizes == [(16, 24), (16, 24), (8, 12), (4, 6), (4, 6)]
    assert all(conv.dilation == (1, 1) for conv in model.modules() if isinstance(conv, nn.Conv2d))


def test_resnet50_edge_branch_has_125k_parameters():
    model = AffinityNet("resnet50")
    assert sum(p.numel() for p in model.parameter_groups()[0].params) == 125_409
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.parameter_groups()[0].params}


def test_backbone_is_frozen_through_a_training_step():
    torch.manual_seed(0)
    model = AffinityNet("resnet18", path_index=PathIndex(5, (16, 20))).train()
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) and m.eps == 1e-5 for m in norms)
    assert all(not stage.training for stage in model.stages) and model.fc_edge6.training
    # Non-trivial statistics, so that using them (or batch statistics) shows in the output.
    for norm in norms:
        norm.running_mean.uniform_(-0.1, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
    backbone_before = {k: v.clone() for stage in model.stages for k, v in stage.state_dict().items()}
    edge_before = [p.detach().clone() for p in model.parameter_groups()[0].params]
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        eval_logits = model.eval()(images)
    model.train()
    torch.testing.assert_close(model(images), eval_logits)  # running statistics in train mode too

    optimizer = torch.optim.SGD(model.parameter_groups()[0].params, lr=0.1)
    targets = affinity_targets(torch.randint(0, 3, (16, 20)), PathIndex(5, (16, 20)), num_classes=3)
    losses = affinity_loss(model.affinity(model(images)), *(t.expand(2, -1, -1) for t in targets))
    losses["loss"].backward()
    optimizer.step()

    assert all(p.grad is None for stage in model.stages for p in stage.parameters())
    backbone_after = {k: v for stage in model.stages for k, v in stage.state_dict().items()}
    assert all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before)
    assert any(not torch.equal(a, b) for a, b in zip(edge_before, model.parameter_groups()[0].params))


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    label = torch.zeros(16, 20, dtype=torch.int64)
    label[3:12, 2:9] = 1
    label[6:15, 11:18] = 2
    label[0, :] = 255
    images = 0.3 * torch.randn(2, 3, 64, 80, generator=generator)
    big = F.interpolate(label[None, None].float(), scale_factor=4, mode="nearest")[0, 0]
    for k, colour in ((1, (1.5, -1.0, 0.5)), (2, (-1.0, 1.5, -0.5))):
        images[:, :, big == k] += torch.tensor(colour)[None, :, None]
    return images, label


def test_loss_is_finite_and_decreases_on_a_toy_batch():
    torch.manual_seed(0)
    path_index = PathIndex(5, (16, 20))
    model = AffinityNet("resnet18", path_index=path_index).train()
    images, label = toy_batch()
    targets = [t.expand(2, -1, -1) for t in affinity_targets(label, path_index, num_classes=3)]
    assert all(t.sum() > 0 for t in targets)
    optimizer = torch.optim.SGD(model.parameter_groups()[0].params, lr=0.1, momentum=0.9)
    history = []
    for _ in range(8):
        losses = affinity_loss(model.affinity(model(images)), *targets)
        assert set(losses) == {"loss", "bg_loss", "fg_loss", "neg_loss"}
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]


def test_affinity_loss_by_hand():
    aff = torch.tensor([[[0.9, 0.2, 0.6, 0.3]]])
    bg_pos = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    fg_pos = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])
    neg = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]])
    eps = 1e-5
    bg = -math.log(0.9 + eps) / (1 + eps)
    fg = -math.log(0.6 + eps) / (1 + eps)
    ng = (-math.log(1 + eps - 0.2) - math.log(1 + eps - 0.3)) / (2 + eps)
    losses = affinity_loss(aff, bg_pos, fg_pos, neg)
    expected = {"bg_loss": bg, "fg_loss": fg, "neg_loss": ng, "loss": ((bg + fg) / 2 + ng) / 2}
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5)
    empty = affinity_loss(aff, torch.zeros_like(aff), fg_pos, neg)
    assert empty["bg_loss"].item() == 0.0 and torch.isfinite(empty["loss"])


def test_edge_map_averages_the_flip_and_crops(resnet18_net):
    torch.manual_seed(2)
    image = torch.randn(3, 37, 52)
    edge = resnet18_net.edge_map(image, min_size=64)
    assert edge.shape == (math.ceil(37 / 4), math.ceil(52 / 4))

    batch = F.pad(torch.stack([image, image.flip(-1)]), (0, 64 - 52, 0, 64 - 37))
    logits = resnet18_net(batch)[:, 0, :10, :13]
    torch.testing.assert_close(edge, torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2))
    # With W a multiple of 4 the flip average makes the edge map flip-equivariant.
    torch.testing.assert_close(resnet18_net.edge_map(image.flip(-1), min_size=64).flip(-1), edge)


def test_edge_map_pads_to_512_or_a_multiple_of_16(resnet18_net):
    seen = []
    hook = resnet18_net.stage1.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        assert resnet18_net.edge_map(torch.randn(3, 30, 41)).shape == (8, 11)
        assert resnet18_net.edge_map(torch.randn(3, 20, 530), min_size=16).shape == (5, 133)
    finally:
        hook.remove()
    assert seen == [(2, 3, 512, 512), (2, 3, 32, 544)]


def test_path_indices_stay_out_of_checkpoints():
    model = AffinityNet("resnet18", path_index=PathIndex(10, (32, 32)))
    assert "path_indices_0" in dict(model.named_buffers())
    state = model.state_dict()
    assert not any("path_indices" in key for key in state)
    other = AffinityNet("resnet18", path_index=PathIndex(5, (20, 24)))
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.fc_edge6.weight, model.fc_edge6.weight)


def test_loads_local_torchvision_weights(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.* and num_batches_tracked

    model = AffinityNet("resnet18", pretrained=str(path))
    assert torch.equal(model.stage1[0].weight, reference.conv1.weight)
    assert torch.equal(model.stage1[1].running_mean, reference.bn1.running_mean)
    assert torch.equal(model.stage5[1].conv2.weight, reference.layer4[1].conv2.weight)

    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="resnet34.pth: the weights do not fit a resnet18"):
        AffinityNet("resnet18", pretrained=str(wrong))
    with pytest.raises(CheckpointError, match="missing.pth: --pretrained file not found"):
        AffinityNet("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="backbone"):
        AffinityNet("vgg16")

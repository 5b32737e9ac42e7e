"""Every supported timm family on tiny models: CAAE and SemFormer training, CAMs with CRA, registers,
local weight files against timm's own loader and features, attention maps, fused attention, RoPE, hr_cam."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from core.backbones.build import create_backbone
from core.caae import CAAE
from core.cam import cam_activations, multiscale_cams, scaled_size
from core.checkpoint import CheckpointError
from core.losses import caae_loss, semformer_loss
from core.semformer import SemFormer, SemFormerSegmentor, ae_inputs

TINY = dict(depth=2, embed_dim=48, num_heads=2)
FAMILIES = {  # family -> timm name (with the tag --pretrained timm loads)
    "deit": "deit_small_patch16_224",
    "deit3": "deit3_small_patch16_224",
    "vit21k": "vit_small_patch16_224.augreg_in21k",
    "clip": "vit_base_patch16_clip_224.openai",
    "dinov2": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "eva02": "eva02_small_patch14_224.mim_in22k",
}
PATCH = {name: 14 if "patch14" in name else 16 for name in FAMILIES.values()}
NUM_CLASSES = 4
CLASS_DIM = 32
SGD_STEPS = 4
CAAE_LR, SEMFORMER_LR = 0.05, 0.002  # SemFormer's loss on an untrained CAAE jumps at larger steps


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_params():
    return pytest.mark.parametrize("name", list(FAMILIES.values()), ids=list(FAMILIES))


def segmentor_of(name: str, **kwargs) -> SemFormerSegmentor:
    return SemFormerSegmentor(NUM_CLASSES, backbone_name=name, image_size=2 * PATCH[name], class_dim=CLASS_DIM,
                              backbone_kwargs=TINY, **kwargs)


def caae_of(name: str) -> CAAE:
    return CAAE(NUM_CLASSES, backbone_name=name, image_size=2 * PATCH[name], class_dim=CLASS_DIM, decoder_width=16,
                decoder_depth=1, decoder_heads=2, backbone_kwargs=TINY)


def sgd_losses(model: torch.nn.Module, loss_of, lr: float, steps: int = SGD_STEPS) -> list[float]:
    """Losses of ``steps`` SGD steps on one fixed batch, then the loss after them."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_of().item())
    return losses


# ----------------------------------------------------------------------------- training and CAMs
@family_params()
def test_caae_and_semformer_build_and_training_steps_lower_the_loss(name):
    patch = PATCH[name]
    labels = torch.tensor([[1.0, 1, 0, 1], [1.0, 0, 1, 0]])
    caae = caae_of(name).train()
    ae_batch = torch.randn(2, 3, 2 * patch, 2 * patch)
    caae_steps = sgd_losses(caae, lambda: caae_loss(*caae(ae_batch, labels), labels, ae_batch)["loss"], CAAE_LR)
    assert caae_steps[-1] < caae_steps[0]

    model = SemFormer(segmentor_of(name, dropout=0.0), caae_of(name)).train()
    images = torch.randn(2, 3, 4 * patch, 3 * patch)
    ae_images, grad_masks = ae_inputs(images, torch.tensor([[0, 0, 3 * patch, 4 * patch], [0, 0, 2 * patch, 3 * patch]]),
                                      2 * patch)
    semformer_steps = sgd_losses(
        model, lambda: semformer_loss(model(images, ae_images, labels, grad_masks), labels, grad_masks)["loss"],
        SEMFORMER_LR,
    )
    assert semformer_steps[-1] < semformer_steps[0]


@family_params()
def test_cam_inference_with_cra_gives_maps_of_the_image_size(name):
    segmentor = segmentor_of(name).eval()
    height, width, patch = 45, 61, PATCH[name]
    inputs = [torch.randn(3, *scaled_size(height, width, scale, patch)) for scale in (1.0, 0.5, 1.5)]
    activations = functools.partial(cam_activations, segmentor, with_cra=True, cra_layers=2)
    keys = np.array([0, 1, 3])
    cams = multiscale_cams(activations, inputs, (height, width), keys, segmentor.backbone.patch_size)
    assert cams["cam"].shape == (2, 12, 16) and cams["hr_cam"].shape == (2, height, width)
    assert np.isfinite(cams["hr_cam"]).all() and cams["hr_cam"].min() >= 0 and cams["hr_cam"].max() <= 1


# ----------------------------------------------------------------------------- registers
@pytest.mark.parametrize("name, overrides", [("vit_small_patch14_reg4_dinov2.lvd142m", {}),
                                             ("vit_small_patch16_224", dict(reg_tokens=2))],
                         ids=["dinov2_reg4", "vit_reg2_with_positions"])
def test_registers_take_part_in_every_block_but_not_in_the_cra_or_the_patch_grid(name, overrides):
    backbone = create_backbone(name, image_size=2 * PATCH.get(name, 16), **TINY, **overrides).eval()
    registers = backbone.model.reg_token.shape[1]
    assert backbone.num_registers == registers > 0
    seen = []
    for block in backbone.model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    patch = backbone.patch_size
    images = torch.randn(2, 3, 3 * patch, 5 * patch)  # grid 3 x 5
    tokens = torch.randn(1, NUM_CLASSES, 48)
    with torch.no_grad():
        out, maps = backbone.forward_with_tokens(images, tokens, tokens, return_attn=True, attn_layers=2)
        features = backbone.forward_features(images)
    assert seen[:2] == [NUM_CLASSES + registers + 15] * 2 and seen[2:] == [registers + 15] * 2
    assert out.shape == (2, NUM_CLASSES + 15, 48) and features.shape == (2, 15, 48)
    assert [m.shape for m in maps] == [(2, 2, NUM_CLASSES + 15, NUM_CLASSES + 15)] * 2
    assert all((m.sum(-1) < 1).all() for m in maps)  # the registers' share of each row is left out

    segmentor = SemFormerSegmentor(NUM_CLASSES, backbone_name=name, image_size=2 * patch, class_dim=CLASS_DIM,
                                   backbone_kwargs={**TINY, **overrides}).eval()
    with torch.no_grad():
        seg_logits, cra = segmentor(images, return_cra=True, cra_layers=2)
    assert seg_logits.shape == cra.shape == (2, NUM_CLASSES, 3, 5)


# ----------------------------------------------------------------------------- weights and features
def reference_and_file(name: str, tmp_path, **overrides):
    reference = timm.create_model(name, pretrained=False, **TINY, **overrides).eval()
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


@family_params()
def test_a_saved_timm_state_dict_loads_as_pretrained_file_and_reproduces_timms_features(name, tmp_path):
    size = 4 * PATCH[name]  # the timm model's own grid: no position resize
    reference, path = reference_and_file(name, tmp_path, img_size=size)
    backbone = create_backbone(name, image_size=size, pretrained=str(path), img_size=size, **TINY).eval()

    # The same weights as timm's own loader of a local file.
    by_timm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=size, **TINY)
    ours = backbone.model.state_dict()
    for key, value in by_timm.state_dict().items():
        if key in ours and not key.startswith("reg_token"):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)

    # timm's sequence is [cls, registers, patches]: our one leading token is its class token.
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference.fc_norm(reference.forward_features(images))
        out = backbone.forward_with_tokens(images, backbone.cls_token_init, backbone.cls_pos_init)
    prefix = reference.num_prefix_tokens
    torch.testing.assert_close(out[:, 1:], expected[:, prefix:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 0], expected[:, 0], rtol=1e-5, atol=1e-5)


def test_registers_with_their_own_positions_reproduce_timms_features(tmp_path):
    reference, path = reference_and_file("vit_small_patch16_224", tmp_path, img_size=64, reg_tokens=2)
    assert not reference.no_embed_class and reference.pos_embed.shape[1] == 1 + 2 + 16
    backbone = create_backbone("vit_small_patch16_224", image_size=64, pretrained=str(path), img_size=64, reg_tokens=2,
                               **TINY).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_features(images)
        out = backbone.forward_with_tokens(images, backbone.cls_token_init, backbone.cls_pos_init)
    torch.testing.assert_close(out[:, 1:], expected[:, 3:], rtol=1e-5, atol=1e-5)


def test_a_file_that_does_not_fit_names_its_keys_for_every_family(tmp_path):
    _, path = reference_and_file("eva02_small_patch14_224", tmp_path)
    with pytest.raises(CheckpointError, match="missing keys .*blocks"):
        create_backbone("eva02_small_patch14_224", image_size=28, pretrained=str(path), depth=3, embed_dim=48,
                        num_heads=2)


def test_imagenet_is_an_alias_only_for_imagenet_weights(monkeypatch):
    requested = []

    def no_download(*args, pretrained=False, **kwargs):
        requested.append(pretrained)
        return create_model(*args, **kwargs)

    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", no_download)
    create_backbone("deit_small_patch16_224", image_size=32, pretrained="imagenet", **TINY)
    create_backbone("vit_small_patch14_dinov2.lvd142m", image_size=28, pretrained="timm", **TINY)
    assert requested == [True, True]
    with pytest.raises(CheckpointError, match="'lvd142m', not ImageNet's; pass --pretrained timm"):
        create_backbone("vit_small_patch14_dinov2.lvd142m", image_size=28, pretrained="imagenet", **TINY)


def test_unsupported_models_fail_with_one_line_naming_the_families():
    for name, overrides, expected in (("resnet18", {}, "supported families: VisionTransformer"),
                                      ("vit_small_patch16_224", dict(patch_size=(16, 8), **TINY), "square patches")):
        with pytest.raises(ValueError, match=expected) as error:
            create_backbone(name, image_size=32, **overrides)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="multiple of .* patch size 14"):
        create_backbone("vit_small_patch14_dinov2", image_size=32, **TINY)


# ----------------------------------------------------------------------------- attention maps
def explicit_probabilities(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of a timm Attention / EvaAttention on its input ``x (B, T, D)``."""
    batch, tokens, _ = x.shape
    bias = None if getattr(attn, "q_bias", None) is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias if bias is None else bias)
    q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix = attn.num_prefix_tokens
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope)], dim=2)
    return (q @ k.transpose(-2, -1) * attn.head_dim ** -0.5).softmax(dim=-1)


@family_params()
def test_attention_maps_equal_an_explicit_computation(name):
    backbone = create_backbone(name, image_size=2 * PATCH[name], **TINY).eval()
    expected = []

    def explicit(module, args, kwargs):
        expected.append(explicit_probabilities(module, args[0], kwargs.get("rope")))

    for block in backbone.model.blocks:
        block.attn.register_forward_pre_hook(explicit, with_kwargs=True)
    patch, registers = backbone.patch_size, backbone.num_registers
    images = torch.randn(2, 3, 2 * patch, 3 * patch)
    tokens = torch.randn(1, NUM_CLASSES, 48)
    with torch.no_grad():
        plain = backbone.forward_with_tokens(images, tokens, tokens)
        expected.clear()
        out, maps = backbone.forward_with_tokens(images, tokens, tokens, return_attn=True, attn_layers=2)
    keep = [*range(NUM_CLASSES), *range(NUM_CLASSES + registers, NUM_CLASSES + registers + 6)]
    assert len(maps) == len(expected) == 2
    for found, full in zip(maps, expected):
        torch.testing.assert_close(found, full[:, :, keep][..., keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)  # unfused vs fused attention


@family_params()
def test_fused_attention_stays_on_in_blocks_whose_maps_are_not_read(name, monkeypatch):
    backbone = create_backbone(name, image_size=2 * PATCH[name], depth=3, embed_dim=48, num_heads=2).eval()
    fused_calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: fused_calls.append(1) or fused(*args, **kwargs))
    flags = []
    for block in backbone.model.blocks:
        block.attn.register_forward_pre_hook(lambda module, args: flags.append(module.fused_attn))
    tokens = torch.zeros(1, 2, 48)
    with torch.no_grad():
        _, maps = backbone.forward_with_tokens(torch.randn(1, 3, 56, 56), tokens, tokens, return_attn=True, attn_layers=1)
    assert len(maps) == 1 and len(fused_calls) == 2 and flags == [True, True, False]
    assert all(block.attn.fused_attn for block in backbone.model.blocks)  # restored


# ----------------------------------------------------------------------------- EVA-02's rotary embeddings
def test_eva_rope_follows_each_inputs_grid_and_class_tokens_are_prefix_tokens():
    backbone = create_backbone("eva02_small_patch14_224", image_size=28, **TINY).eval()
    seen = []
    for block in backbone.model.blocks:
        block.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((module.attn.num_prefix_tokens, kwargs["rope"].shape[0])),
            with_kwargs=True)
    tokens = torch.randn(1, 3, 48)
    with torch.no_grad():
        for height, width in ((28, 28), (42, 70)):
            backbone.forward_with_tokens(torch.randn(1, 3, height, width), tokens, tokens)
        backbone.forward_features(torch.randn(1, 3, 42, 28))
    assert seen == [(3, 4)] * 2 + [(3, 15)] * 2 + [(0, 6)] * 2


def test_eva_matches_timms_dynamic_size_path_on_a_grid_other_than_its_own(tmp_path):
    reference = timm.create_model("eva02_small_patch14_224", dynamic_img_size=True, img_size=28, **TINY).eval()
    with torch.no_grad():
        reference.pos_embed.zero_()  # timm and we resize position embeddings differently (antialias)
    path = tmp_path / "eva.pth"
    torch.save(reference.state_dict(), path)
    backbone = create_backbone("eva02_small_patch14_224", image_size=28, pretrained=str(path), img_size=28,
                               **TINY).eval()
    images = torch.randn(2, 3, 42, 70)  # grid 3 x 5, the timm model's is 2 x 2
    with torch.no_grad():
        expected = reference.fc_norm(reference.forward_features(images))
        out = backbone.forward_with_tokens(images, backbone.cls_token_init, backbone.cls_pos_init)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_eva_gradient_checkpointing_gives_the_same_gradients():
    backbone = create_backbone("eva02_small_patch14_224", image_size=28, **TINY)
    images = torch.randn(2, 3, 28, 42)
    backbone.forward_features(images).square().sum().backward()
    plain = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    backbone.set_grad_checkpointing(True)
    backbone.forward_features(images).square().sum().backward()
    for before, parameter in zip(plain, backbone.parameters()):
        torch.testing.assert_close(parameter.grad, before)


# ----------------------------------------------------------------------------- hr_cam
@pytest.mark.parametrize("patch, stretched", [(16, (48, 64)), (14, (56, 70))])
def test_hr_cam_is_stretched_to_a_multiple_of_the_patch_size_then_cropped(patch, stretched):
    height, width = 45, 61
    maps = torch.rand(1, 3, 4, 5)

    def activations(batch):
        return torch.cat([maps, maps.flip(-1)])

    cams = multiscale_cams(activations, [torch.zeros(3, 64, 80)], (height, width), np.array([0, 1, 2]), patch)
    resized = F.interpolate(2 * maps[:, 1:], stretched, mode="bilinear", align_corners=False)[0, :, :height, :width]
    expected = resized / (resized.amax(dim=(1, 2), keepdim=True) + 1e-5)
    np.testing.assert_allclose(cams["hr_cam"], expected.numpy(), rtol=1e-5, atol=1e-6)
    exact = multiscale_cams(activations, [torch.zeros(3, 64, 80)], (height, width), np.array([0, 1, 2]), patch,
                            exact_hr_cam=True)
    assert exact["hr_cam"].shape == (2, height, width) and not np.allclose(exact["hr_cam"], cams["hr_cam"])

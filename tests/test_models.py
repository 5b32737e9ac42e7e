"""Backbone, CAAE and SemFormer on tiny timm models: shapes, attention maps, gradients, weight loading."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.backbones.base import block_with_attention
from core.backbones.build import create_backbone
from core.caae import CAAE
from core.checkpoint import CheckpointError
from core.losses import cosine_similarity
from core.semformer import (FeatureDropout, SemFormer, SemFormerSegmentor, SeparateLinear, ae_inputs,
                            class_relevant_attention, load_segmentor_weights)

TINY = dict(depth=2, embed_dim=64, num_heads=2)
NUM_CLASSES = 5
CLASS_DIM = 16


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_segmentor(**kwargs):
    return SemFormerSegmentor(NUM_CLASSES, image_size=32, class_dim=CLASS_DIM, backbone_kwargs=TINY, **kwargs)


def tiny_caae(reduction="sum"):
    return CAAE(
        NUM_CLASSES, image_size=32, class_dim=CLASS_DIM, decoder_width=32, decoder_depth=1, decoder_heads=2,
        reduction=reduction, backbone_kwargs=TINY,
    )


def timm_grid(pos_embed, prefix, side):
    """timm's position embedding without prefix tokens, as a (1, D, side, side) image."""
    return pos_embed[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- backbone
def test_backbone_pads_to_patch_multiple_and_accepts_non_square_inputs():
    backbone = create_backbone("deit_small_patch16_224", image_size=32, **TINY).eval()
    images = torch.randn(2, 3, 40, 70)
    tokens = backbone.forward_features(images)
    assert tokens.shape == (2, 3 * 5, 64)
    padded = F.pad(images, (0, 10, 0, 8))
    torch.testing.assert_close(tokens, backbone.forward_features(padded), rtol=0, atol=0)
    assert (backbone.embed_dim, backbone.num_heads, backbone.patch_size) == (64, 2, 16)


@pytest.mark.parametrize("model_name, prefix", [("deit_small_patch16_224", 1), ("deit_base_distilled_patch16_224", 2)])
def test_backbone_reads_and_resizes_the_pretrained_position_embedding(tmp_path, model_name, prefix):
    reference = timm.create_model(model_name, **TINY)
    path = tmp_path / "weights.pth"
    torch.save({"model": reference.state_dict()}, path)  # DeiT's release layout
    backbone = create_backbone(model_name, image_size=448, pretrained=str(path), **TINY)

    grid = timm_grid(reference.pos_embed.detach(), prefix, 14)
    expected = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False)
    torch.testing.assert_close(backbone.grid_posembed.detach(), expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(backbone.cls_token_init, reference.cls_token.detach())
    torch.testing.assert_close(backbone.cls_pos_init, reference.pos_embed.detach()[:, :1])
    torch.testing.assert_close(
        backbone.model.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight, rtol=0, atol=0
    )

    # Every forward resizes the 28 x 28 grid to the current one; the training size is a no-op.
    assert backbone.grid_position_embedding((28, 28)) is backbone.grid_posembed
    square = backbone.grid_posembed.detach().reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(3, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(
        backbone.grid_position_embedding((3, 5)).detach(), resized.flatten(2).transpose(1, 2)
    )

    # timm's own prefix tokens, position embedding and heads are gone.
    names = list(backbone.state_dict())
    for removed in ("cls_token", "dist_token", "pos_embed", "head"):
        assert not any(f"model.{removed}" in name for name in names), removed


def test_attention_path_matches_timms_fused_block():
    backbone = create_backbone("deit_small_patch16_224", image_size=32, **TINY).eval()
    block = backbone.model.blocks[-1]
    assert block.attn.fused_attn  # timm's own path is scaled_dot_product_attention
    x = torch.randn(2, 9, 64)
    fused = block(x)
    manual, probabilities = block_with_attention(block, x)
    torch.testing.assert_close(manual, fused, rtol=1e-5, atol=1e-5)

    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).reshape(2, 9, 3, 2, 32).permute(2, 0, 3, 1, 4)
    assert probabilities.shape == (2, 2, 9, 9)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, 9))
    torch.testing.assert_close(probabilities @ v, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_outer_tokens_and_attention_maps_for_non_square_inputs():
    backbone = create_backbone("deit_small_patch16_224", image_size=32, **TINY).eval()
    tokens, token_pos = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    images = torch.randn(2, 3, 40, 70)  # grid 3 x 5
    plain = backbone.forward_with_tokens(images, tokens, token_pos)
    with_attention, maps = backbone.forward_with_tokens(images, tokens, token_pos, return_attn=True, attn_layers=1)
    assert plain.shape == (2, 4 + 15, 64)
    torch.testing.assert_close(with_attention, plain, rtol=1e-5, atol=1e-5)
    assert [m.shape for m in maps] == [(2, 2, 19, 19)]
    _, maps = backbone.forward_with_tokens(images, tokens, token_pos, return_attn=True, attn_layers=2)
    assert len(maps) == 2
    with pytest.raises(ValueError, match="attn_layers"):
        backbone.forward_with_tokens(images, tokens, token_pos, return_attn=True, attn_layers=3)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    backbone = create_backbone("deit_small_patch16_224", image_size=32, **TINY)
    images = torch.randn(2, 3, 32, 48)
    backbone.forward_features(images).square().sum().backward()
    plain = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    backbone.set_grad_checkpointing(True)
    backbone.forward_features(images).square().sum().backward()
    for before, parameter in zip(plain, backbone.parameters()):
        torch.testing.assert_close(parameter.grad, before)


# ----------------------------------------------------------------------------- weight files
def test_weight_files_load_from_pth_and_safetensors(tmp_path):
    reference = timm.create_model("deit_small_patch16_224", **TINY)
    state = reference.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    headless = {key: value for key, value in state.items() if not key.startswith("head.")}
    torch.save(headless, tmp_path / "headless.pth")  # e.g. exported with num_classes=0
    for name in ("plain.pth", "w.safetensors", "headless.pth"):
        backbone = create_backbone("deit_small_patch16_224", pretrained=str(tmp_path / name), **TINY)
        torch.testing.assert_close(backbone.model.patch_embed.proj.weight, state["patch_embed.proj.weight"])


def test_offline_imagenet_weights_fail_with_one_line_naming_the_alternatives(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")
        return create_model(*args, **kwargs)

    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CheckpointError) as error:
        create_backbone("deit_small_patch16_224", pretrained="imagenet", **TINY)
    message = str(error.value)
    assert "\n" not in message and "--pretrained PATH" in message and "--pretrained none" in message


def test_corrupt_weight_file_fails_naming_the_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth: cannot read"):
        create_backbone("deit_small_patch16_224", pretrained=str(path), **TINY)
    with pytest.raises(CheckpointError, match="absent.pth: --pretrained file not found"):
        create_backbone("deit_small_patch16_224", pretrained=str(tmp_path / "absent.pth"), **TINY)


def test_tampered_weight_file_fails_naming_keys_and_shapes(tmp_path):
    state = timm.create_model("deit_small_patch16_224", **TINY).state_dict()
    state["blocks.0.attn.qkv.extra"] = state.pop("blocks.0.attn.qkv.weight")
    state["norm.weight"] = torch.ones(65)
    path = tmp_path / "tampered.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        create_backbone("deit_small_patch16_224", pretrained=str(path), **TINY)
    message = str(error.value)
    assert "tampered.pth" in message
    assert "missing keys (1): blocks.0.attn.qkv.weight" in message
    assert "unexpected keys (1): blocks.0.attn.qkv.extra" in message
    assert "norm.weight: expected [64], found [65]" in message


# ----------------------------------------------------------------------------- CRA
def test_class_relevant_attention_matches_a_direct_loop():
    num_tokens, grid = 3, (2, 4)
    total = num_tokens + grid[0] * grid[1]
    attentions = [torch.rand(2, 4, total, total).softmax(-1) for _ in range(3)]
    cra = class_relevant_attention(attentions, num_tokens, grid)
    assert cra.shape == (2, num_tokens, *grid)
    for b in range(2):
        for k in range(num_tokens):
            scores = [
                sum(sum(a[b, h, k, num_tokens + n].item() for h in range(4)) / 4 for a in attentions)
                for n in range(total - num_tokens)
            ]
            low, high = min(scores), max(scores)
            expected = torch.tensor([(s - low) / (high - low + 1e-5) for s in scores]).reshape(grid)
            torch.testing.assert_close(cra[b, k], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- SemFormer segmentor
def test_segmentor_outputs_in_train_and_eval_for_non_square_inputs():
    segmentor = tiny_segmentor().train()
    images = torch.randn(2, 3, 40, 70)  # grid 3 x 5
    class_embeddings, seg_logits = segmentor(images)
    assert class_embeddings.shape == (2, NUM_CLASSES, CLASS_DIM) and class_embeddings.min() >= 0
    assert seg_logits.shape == (2, NUM_CLASSES, 3, 5)
    with pytest.raises(ValueError, match="eval"):
        segmentor(images, return_cra=True)

    segmentor.eval()
    seg_logits = segmentor(images)
    with_cra, cra = segmentor(images, return_cra=True, cra_layers=2)
    assert seg_logits.shape == cra.shape == (2, NUM_CLASSES, 3, 5)
    torch.testing.assert_close(with_cra, seg_logits, rtol=1e-5, atol=1e-5)
    assert cra.min() >= 0 and cra.max() < 1
    torch.testing.assert_close(cra.amin(dim=(2, 3)), torch.zeros(2, NUM_CLASSES))


def test_segmentor_class_tokens_and_heads_initialisation():
    segmentor = tiny_segmentor()
    backbone = segmentor.backbone
    torch.testing.assert_close(segmentor.cls_token.detach(), backbone.cls_token_init.expand(1, NUM_CLASSES, 64))
    torch.testing.assert_close(segmentor.cls_posembed.detach(), backbone.cls_pos_init.expand(1, NUM_CLASSES, 64))
    head = segmentor.cls_head
    assert head.weight.shape == (NUM_CLASSES, 64, CLASS_DIM) and head.bias.shape == (NUM_CLASSES, CLASS_DIM)
    weight_bound = 1 / math.sqrt(64 * CLASS_DIM)  # the original's fan-in quirk
    assert weight_bound / 2 < head.weight.abs().max() <= weight_bound
    assert 1 / math.sqrt(64) / 2 < head.bias.abs().max() <= 1 / math.sqrt(64)

    x = torch.randn(3, NUM_CLASSES, 64)
    expected = torch.stack([x[:, k] @ head.weight[k] + head.bias[k] for k in range(NUM_CLASSES)], dim=1)
    torch.testing.assert_close(head(x), expected)
    assert isinstance(head, SeparateLinear)


@pytest.mark.parametrize("mode, kept_axis", [("token", 2), ("channel", 1)])
def test_seg_dropout_zeroes_whole_tokens_or_channels(mode, kept_axis):
    dropout = FeatureDropout(0.5, mode).train()
    out = dropout(torch.ones(4, 30, 20))
    values = set(out.unique().tolist())
    assert values == {0.0, 2.0}
    # Along the kept axis every entry shares the mask: each token (or channel) is all 0 or all 2.
    assert torch.equal(out.amin(dim=kept_axis), out.amax(dim=kept_axis))
    assert torch.equal(dropout.eval()(out), out)
    with pytest.raises(ValueError, match="seg_dropout"):
        FeatureDropout(0.5, "pixel")


# ----------------------------------------------------------------------------- CAAE
def test_caae_shapes_and_reductions():
    caae = tiny_caae().eval()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 1, 0, 0, 0], [1.0, 0, 1, 1, 0]])
    sim, recon = caae(images, labels)
    assert sim.shape == (2, NUM_CLASSES) and recon.shape == images.shape
    assert sim.min() >= 0 and sim.max() < 1
    cre = caae.get_cre(images)
    assert cre.shape == (2, NUM_CLASSES, CLASS_DIM)
    assert caae.get_crs(3).shape == (3, NUM_CLASSES, CLASS_DIM)
    torch.testing.assert_close(sim, cosine_similarity(cre, caae.get_crs(2)))

    mean_caae = tiny_caae("mean").eval()
    mean_caae.load_state_dict(caae.state_dict())
    torch.testing.assert_close(mean_caae.get_cre(images), cre / 4)  # 2 x 2 patches


def test_caae_decoder_folds_patch_vectors_as_channel_row_column():
    decoder = tiny_caae().decoder
    tokens = torch.randn(2, 6, 32)
    image = decoder(tokens, (2, 3))
    patches = decoder.mlp(decoder.norm(decoder.blocks(tokens)))  # (B, h*w, 3*p*p)
    expected = patches.reshape(2, 2, 3, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 48)
    torch.testing.assert_close(image, expected)


def test_caae_label_trick_sends_gradient_only_to_present_classes():
    caae = tiny_caae()
    labels = torch.tensor([[1.0, 1, 0, 0, 0], [1.0, 0, 0, 1, 0]])
    sim, _ = caae(torch.randn(2, 3, 32, 32), labels)
    F.binary_cross_entropy(sim, labels).backward()
    gradient_rows = caae.crs[0].weight.grad.abs().sum(dim=1)
    assert (gradient_rows[[0, 1, 3]] > 0).all()
    assert (gradient_rows[[2, 4]] == 0).all()
    assert caae.convert[0].weight.grad.abs().sum() > 0  # absent classes still train the encoder side


# ----------------------------------------------------------------------------- SemFormer training forward
def test_ae_inputs_resize_and_box_masks():
    images = torch.randn(2, 3, 8, 8)
    boxes = torch.tensor([[0, 0, 8, 5], [3, 1, 8, 8]])
    ae_images, grad_masks = ae_inputs(images, boxes, 4)
    torch.testing.assert_close(ae_images, F.interpolate(images, (4, 4), mode="bilinear", align_corners=True))
    expected = torch.zeros(2, 1, 4, 4)
    expected[0, 0, 0:2, 0:4] = 1  # floor([0, 0, 8, 5] * 4 / 8) = [0, 0, 4, 2]
    expected[1, 0, 0:4, 1:4] = 1  # floor([3, 1, 8, 8] * 4 / 8) = [1, 0, 4, 4]
    torch.testing.assert_close(grad_masks, expected)


def test_semformer_forward_train_outputs_and_gradients():
    model = SemFormer(tiny_segmentor(), tiny_caae()).train()
    assert not model.ae.training and not any(p.requires_grad for p in model.ae.parameters())
    images = torch.randn(2, 3, 64, 64)
    ae_images, grad_masks = ae_inputs(images, torch.tensor([[0, 0, 64, 40], [8, 0, 64, 64]]), 32)
    labels = torch.tensor([[1.0, 1, 0, 1, 0], [1.0, 0, 0, 0, 0]])
    out = model.forward_train(images, ae_images, labels, grad_masks)

    assert out["masks"].shape == (2, NUM_CLASSES, 32, 32) and out["seg_sim"].shape == (2, NUM_CLASSES)
    assert out["masks"][0, :, 20:].abs().sum() == 0 and out["masks"][1, :, :, :4].abs().sum() == 0
    # Pairs (0,0), (0,1), (0,3), (1,0): one pull each; pushes are the image's other present classes.
    assert [out[name].numel() for name in ("fg_pull", "fg_push", "bg_pull", "bg_push")] == [4, 6, 6, 4]
    with torch.no_grad():
        masks, crs = out["masks"], model.ae.get_crs(1)[0]
        fg_03 = model.ae.get_cre(ae_images[:1] * masks[0, 3])[0]
        bg_01 = model.ae.get_cre(ae_images[:1] * (1 - masks[0, 1]))[0]
    torch.testing.assert_close(out["fg_pull"][2], cosine_similarity(fg_03[3], crs[3]), rtol=1e-4, atol=1e-5)
    # bg_pull of pair (0,1) compares its background image with classes 0 and 3 (entries 2, 3).
    torch.testing.assert_close(out["bg_pull"][2:4], cosine_similarity(bg_01[[0, 3]], crs[[0, 3]]), rtol=1e-4, atol=1e-5)

    total = sum(value.sum() for value in out.values())
    total.backward()
    segmentor = model.segmentor
    for parameter in (segmentor.cls_token, segmentor.seg_head[1].weight, segmentor.backbone.grid_posembed,
                      segmentor.backbone.model.blocks[0].attn.qkv.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.ae.parameters())

    with pytest.raises(ValueError, match="training mode"):
        model.eval().forward_train(images, ae_images, labels, grad_masks)
    assert not model.train().ae.training


def test_segmentor_state_dict_round_trip_without_the_ae(tmp_path):
    model = SemFormer(tiny_segmentor(), tiny_caae())
    saved = model.segmentor_state_dict()
    assert saved and all(key.startswith("segmentor.") for key in saved)
    assert "segmentor.cls_head.weight" in saved and "segmentor.seg_head.1.weight" in saved
    fresh = tiny_segmentor()
    load_segmentor_weights(fresh, saved, "saved.pth")
    torch.testing.assert_close(fresh.cls_token, model.segmentor.cls_token)
    with pytest.raises(CheckpointError, match="prefix"):
        load_segmentor_weights(fresh, model.state_dict(), "whole.pth")


def test_blocks_whose_attention_the_cra_does_not_need_run_fused_attention(monkeypatch):
    backbone = create_backbone("deit_small_patch16_224", image_size=64, depth=4, embed_dim=32, num_heads=2).eval()
    fused_calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: fused_calls.append(1) or fused(*args, **kwargs))
    tokens = torch.zeros(1, 3, 32)
    with torch.no_grad():
        _, probabilities = backbone.forward_with_tokens(torch.randn(1, 3, 64, 64), tokens, tokens,
                                                        return_attn=True, attn_layers=1)
    assert len(probabilities) == 1 and len(fused_calls) == 3  # SDPA in the first 3 blocks, probabilities in the last


@pytest.mark.parametrize("backbone", ["vit_small_patch16_224", "deit_tiny_patch16_224"])
def test_another_timm_vit_is_a_flag_away(backbone):
    segmentor = SemFormerSegmentor(NUM_CLASSES, backbone_name=backbone, image_size=32, class_dim=CLASS_DIM,
                                   backbone_kwargs=dict(depth=2, embed_dim=32, num_heads=2)).eval()
    with torch.no_grad():
        seg_logits, cra = segmentor(torch.randn(1, 3, 48, 32), return_cra=True, cra_layers=2)
    assert seg_logits.shape == cra.shape == (1, NUM_CLASSES, 3, 2)

"""Importing the original checkpoints: the Appendix's key layout, written out independently of our models."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.caae import CAAE
from core.checkpoint import CheckpointError
from core.semformer import SemFormerSegmentor, load_segmentor_weights
from tools.import_original import UNUSED_ORIGINAL_KEYS, import_checkpoint, main

TINY = dict(depth=2, embed_dim=64, num_heads=2)
DEIT_CLASSES = 1000  # ImageNet head of the distilled DeiT, kept (unused) in the CAAE checkpoint
PRETRAIN_GRID = 14  # DeiT's 224 px position grid


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the Appendix's layouts
def vit_block_shapes(prefix, dim):
    return {
        f"{prefix}norm1.weight": (dim,), f"{prefix}norm1.bias": (dim,),
        f"{prefix}attn.qkv.weight": (3 * dim, dim), f"{prefix}attn.qkv.bias": (3 * dim,),
        f"{prefix}attn.proj.weight": (dim, dim), f"{prefix}attn.proj.bias": (dim,),
        f"{prefix}norm2.weight": (dim,), f"{prefix}norm2.bias": (dim,),
        f"{prefix}mlp.fc1.weight": (4 * dim, dim), f"{prefix}mlp.fc1.bias": (4 * dim,),
        f"{prefix}mlp.fc2.weight": (dim, 4 * dim), f"{prefix}mlp.fc2.bias": (dim,),
    }


def vit_shapes(prefix, dim, depth, patch):
    shapes = {f"{prefix}patch_embed.proj.weight": (dim, 3, patch, patch), f"{prefix}patch_embed.proj.bias": (dim,)}
    for index in range(depth):
        shapes.update(vit_block_shapes(f"{prefix}blocks.{index}.", dim))
    shapes.update({f"{prefix}norm.weight": (dim,), f"{prefix}norm.bias": (dim,)})
    return shapes


def semformer_shapes(num_classes=21, dim=384, depth=12, class_dim=256, grid=28, patch=16):
    """The released SemFormer checkpoint (DeiT-S at 448 px by default)."""
    backbone = "segmentor.backbone."
    shapes = {
        "segmentor.cls_token": (1, num_classes, dim),
        "segmentor.cls_posembed": (1, num_classes, dim),
        f"{backbone}grid_posembed": (1, grid * grid, dim),
        f"{backbone}model.cls_token": (1, 1, dim),
        f"{backbone}model.pos_embed": (1, PRETRAIN_GRID ** 2 + 1, dim),
    }
    shapes.update(vit_shapes(f"{backbone}model.", dim, depth, patch))
    shapes.update({
        "segmentor.cls_head.weight": (num_classes, dim, class_dim),
        "segmentor.cls_head.bias": (num_classes, class_dim),
        "segmentor.seg_head.1.weight": (num_classes, dim),
        "segmentor.seg_head.1.bias": (num_classes,),
    })
    return shapes


def caae_shapes(num_classes=21, dim=768, depth=12, class_dim=256, grid=14, patch=16,
                decoder_width=768, decoder_depth=8):
    """The CAAE checkpoint of train_caae.py (DeiT-B distilled at 224 px by default)."""
    model = "encoder.vit_backbone.model."
    shapes = {"encoder.vit_backbone.grid_posembed": (1, grid * grid, dim)}
    shapes.update(vit_shapes(model, dim, depth, patch))
    shapes.update({
        f"{model}dist_token": (1, 1, dim),
        f"{model}head_dist.weight": (DEIT_CLASSES, dim),
        f"{model}head_dist.bias": (DEIT_CLASSES,),
        "convert.0.weight": (num_classes * class_dim, dim),
        "re_convert.0.weight": (dim, num_classes * class_dim),
        "re_convert.1.weight": (dim,),
        "re_convert.1.bias": (dim,),
        "crs.0.weight": (num_classes, class_dim),
        "mlp.weight": (decoder_width, dim),
        "mlp.bias": (decoder_width,),
    })
    for index in range(decoder_depth):
        shapes.update(vit_block_shapes(f"decoder.blocks.{index}.", decoder_width))
    shapes.update({
        "decoder.norm.weight": (decoder_width,),
        "decoder.norm.bias": (decoder_width,),
        "decoder.mlp.weight": (3 * patch * patch, decoder_width),
        "decoder.mlp.bias": (3 * patch * patch,),
    })
    return shapes


def random_state(shapes, device="cpu"):
    return {key: 0.5 * torch.randn(shape, device=device) for key, shape in shapes.items()}


def count(shapes):
    return len(shapes), sum(math.prod(shape) for shape in shapes.values())


# ----------------------------------------------------------------------------- a reference forward from raw tensors
def reference_block(x, weights, prefix, heads, eps):
    def linear(inputs, name):
        return F.linear(inputs, weights[f"{prefix}{name}.weight"], weights[f"{prefix}{name}.bias"])

    def norm(inputs, name):
        dim = inputs.shape[-1]
        return F.layer_norm(inputs, (dim,), weights[f"{prefix}{name}.weight"], weights[f"{prefix}{name}.bias"], eps)

    batch, tokens, dim = x.shape
    qkv = linear(norm(x, "norm1"), "attn.qkv").reshape(batch, tokens, 3, heads, dim // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    attention = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)
    x = x + linear((attention @ v).transpose(1, 2).reshape(batch, tokens, dim), "attn.proj")
    return x + linear(F.gelu(linear(norm(x, "norm2"), "mlp.fc1")), "mlp.fc2")


def reference_vit(images, weights, prefix, grid_posembed, depth, heads, lead=None, lead_pos=None):
    """Patch conv (zero padding right/bottom), bicubic grid positions, blocks, final norm (eps 1e-6)."""
    kernel = weights[f"{prefix}patch_embed.proj.weight"]
    patch = kernel.shape[-1]
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, -width % patch, 0, -height % patch))
    patches = F.conv2d(padded, kernel, weights[f"{prefix}patch_embed.proj.bias"], stride=patch)
    grid = patches.shape[-2:]
    side = math.isqrt(grid_posembed.shape[1])
    position = grid_posembed.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    position = F.interpolate(position, size=grid, mode="bicubic", align_corners=False)
    x = (patches + position).flatten(2).transpose(1, 2)
    if lead is not None:
        x = torch.cat([(lead + lead_pos).expand(x.shape[0], -1, -1), x], dim=1)
    for index in range(depth):
        x = reference_block(x, weights, f"{prefix}blocks.{index}.", heads, eps=1e-6)
    dim = x.shape[-1]
    return F.layer_norm(x, (dim,), weights[f"{prefix}norm.weight"], weights[f"{prefix}norm.bias"], 1e-6), grid


# ----------------------------------------------------------------------------- SemFormer
def test_full_paper_semformer_layout_imports_with_only_the_unused_keys_left():
    shapes = semformer_shapes()
    assert count(shapes) == (157, 24_060_693)  # the Appendix's numbers
    state = random_state(shapes)
    ours, report = import_checkpoint("semformer", state)
    assert sorted(report.unused) == sorted(UNUSED_ORIGINAL_KEYS["semformer"]) and report.unexpected == []
    assert report.tensors == 155 and report.values == 24_060_693 - 384 - 197 * 384

    segmentor = SemFormerSegmentor(21)  # the paper model, built on CPU without downloads
    load_segmentor_weights(segmentor, ours, "imported")
    torch.testing.assert_close(segmentor.cls_head.weight, state["segmentor.cls_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(segmentor.backbone.grid_posembed, state["segmentor.backbone.grid_posembed"])


def test_imported_semformer_computes_what_the_original_tensors_define():
    num_classes, class_dim = 5, 16
    state = random_state(semformer_shapes(num_classes, dim=64, depth=2, class_dim=class_dim, grid=2))
    ours, report = import_checkpoint("semformer", state, image_size=32, backbone_kwargs=TINY)
    assert report.unexpected == [] and len(report.unused) == 2
    segmentor = SemFormerSegmentor(num_classes, image_size=32, class_dim=class_dim, backbone_kwargs=TINY)
    load_segmentor_weights(segmentor, ours, "imported")

    images = torch.randn(2, 3, 40, 56)  # padded to 48 x 64: a 3 x 4 grid from the 2 x 2 trained one
    tokens, grid = reference_vit(
        images, state, "segmentor.backbone.model.", state["segmentor.backbone.grid_posembed"], depth=2, heads=2,
        lead=state["segmentor.cls_token"], lead_pos=state["segmentor.cls_posembed"],
    )
    seg_weight, seg_bias = state["segmentor.seg_head.1.weight"], state["segmentor.seg_head.1.bias"]
    seg_logits = F.linear(tokens[:, num_classes:], seg_weight, seg_bias)
    seg_logits = seg_logits.transpose(1, 2).reshape(2, num_classes, *grid)
    class_embeddings = torch.stack([
        tokens[:, k] @ state["segmentor.cls_head.weight"][k] + state["segmentor.cls_head.bias"][k]
        for k in range(num_classes)
    ], dim=1).relu()

    with torch.no_grad():
        torch.testing.assert_close(segmentor.eval()(images), seg_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(segmentor.train()(images)[0], class_embeddings, rtol=1e-4, atol=1e-4)


def test_mismatched_semformer_checkpoint_fails_naming_key_and_shapes():
    state = random_state(semformer_shapes(5, dim=64, depth=2, class_dim=16, grid=2))
    state["segmentor.seg_head.1.weight"] = torch.zeros(5, 63)
    del state["segmentor.backbone.model.blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError) as error:
        import_checkpoint("semformer", state, image_size=32, backbone_kwargs=TINY)
    message = str(error.value)
    assert "missing keys (1): segmentor.backbone.model.blocks.1.mlp.fc2.bias" in message
    assert "segmentor.seg_head.1.weight: expected [5, 64], found [5, 63]" in message
    with pytest.raises(CheckpointError, match="not a caae checkpoint"):
        import_checkpoint("caae", state)


def test_command_line_import_writes_our_state_dict(tmp_path):
    state = random_state(semformer_shapes())
    source, target = tmp_path / "SemFormer@CAAE@DeiT-B-Dist.pth", tmp_path / "models" / "SemFormer.pth"
    torch.save(state, source)
    main(["--kind", "semformer", str(source), str(target)])
    written = torch.load(target, weights_only=True)
    assert len(written) == 155 and sorted(p.name for p in target.parent.iterdir()) == ["SemFormer.json", "SemFormer.pth"]
    description = json.loads(target.with_suffix(".json").read_text())  # what inference_semformer.py rebuilds
    assert (description["kind"], description["num_classes"], description["class_dim"]) == ("semformer", 21, 256)
    torch.testing.assert_close(written["segmentor.cls_token"], state["segmentor.cls_token"], rtol=0, atol=0)

    partial = tmp_path / "partial.pth"
    torch.save({"segmentor.cls_head.bias": state["segmentor.cls_head.bias"]}, partial)
    with pytest.raises(CheckpointError, match=r"partial.pth: .*\nmissing keys \(154\)"):
        main(["--kind", "semformer", str(partial), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


# ----------------------------------------------------------------------------- CAAE
def test_full_paper_caae_layout_imports_with_only_the_unused_keys_left():
    shapes = caae_shapes()
    assert count(shapes) == (259, 152_717_032)  # the Appendix's numbers
    _, report = import_checkpoint("caae", random_state(shapes, device="meta"))
    assert sorted(report.unused) == sorted(UNUSED_ORIGINAL_KEYS["caae"]) and report.unexpected == []
    assert report.tensors == 256


def test_imported_caae_computes_what_the_original_tensors_define():
    num_classes, class_dim, width = 4, 8, 32
    shapes = caae_shapes(num_classes, dim=64, depth=2, class_dim=class_dim, grid=2,
                         decoder_width=width, decoder_depth=1)
    state = random_state(shapes)
    model_kwargs = dict(image_size=32, decoder_width=width, decoder_depth=1, decoder_heads=2, backbone_kwargs=TINY)
    ours, report = import_checkpoint("caae", state, **model_kwargs)
    assert sorted(report.unused) == sorted(UNUSED_ORIGINAL_KEYS["caae"])
    caae = CAAE(num_classes, class_dim=class_dim, **model_kwargs).eval()
    caae.load_state_dict(ours)

    images = torch.randn(2, 3, 32, 48)
    tokens, (h, w) = reference_vit(images, state, "encoder.vit_backbone.model.",
                                   state["encoder.vit_backbone.grid_posembed"], depth=2, heads=2)
    embeddings = F.linear(tokens, state["convert.0.weight"]).relu()
    cre = embeddings.sum(dim=1).reshape(2, num_classes, class_dim)
    x = F.layer_norm(F.linear(embeddings, state["re_convert.0.weight"]), (64,),
                     state["re_convert.1.weight"], state["re_convert.1.bias"], 1e-5)
    x = reference_block(F.linear(x, state["mlp.weight"], state["mlp.bias"]), state, "decoder.blocks.0.", 2, eps=1e-5)
    x = F.layer_norm(x, (width,), state["decoder.norm.weight"], state["decoder.norm.bias"], 1e-5)
    patches = F.linear(x, state["decoder.mlp.weight"], state["decoder.mlp.bias"])  # (B, h*w, 3*16*16)
    recon = patches.reshape(2, h, w, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, h * 16, w * 16)
    crs = state["crs.0.weight"].relu()

    labels = torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 1]])
    with torch.no_grad():
        sim, ours_recon = caae(images, labels)
        torch.testing.assert_close(caae.get_cre(images), cre, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_recon, recon, rtol=1e-4, atol=1e-4)
    expected_sim = F.cosine_similarity(cre, crs.expand(2, -1, -1), dim=-1, eps=1e-8).clamp(-1 + 1e-4, 1 - 1e-4)
    torch.testing.assert_close(sim, expected_sim, rtol=1e-4, atol=1e-5)

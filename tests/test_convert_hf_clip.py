"""Hugging Face CLIPVisionModel / CLIPModel -> clipdino exports: parity (quick_gelu, eos pooling), CLI, errors."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.convert.hf_clip import convert_hf_clip_state_dict, load_hf_clip, main  # noqa: E402
from models.export import load_export  # noqa: E402

TOL = 1e-5
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=0)


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens() -> torch.Tensor:
    ids = torch.randint(1, 98, (3, 16), generator=torch.Generator().manual_seed(3))
    ids[0, 5], ids[0, 6:] = 99, 0  # eos then padding
    ids[1, 15] = 99
    ids[2, 2], ids[2, 9] = 99, 99  # pooling takes the first eos
    return ids


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return perturb(transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                                  projection_dim=24)))


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object from get_*_features


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_model_matches_pooler_output(act, images, tmp_path):
    torch.manual_seed(0)
    hf = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, hidden_act=act)))
    with torch.no_grad():
        ref = hf(pixel_values=images).pooler_output
    vit, config = convert_hf_clip_state_dict(hf.state_dict(), hf.config.to_dict())
    assert config["vision"]["act"] == act and config["vision"]["pre_norm"] and not config["vision"]["patch_bias"]
    assert (vit(images) - ref).abs().max().item() < TOL
    hf.save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), "--out", str(tmp_path / "export")]) == 0
    model, cfg = load_export(tmp_path / "export")
    assert cfg["kind"] == "vit"
    with torch.no_grad():
        assert (model(images) - ref).abs().max().item() < TOL
    legacy = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}  # transformers 4.x CLIPVisionModel keys
    vit, _ = convert_hf_clip_state_dict(legacy, hf.config.to_dict())
    assert (vit(images) - ref).abs().max().item() < TOL


def test_clip_model_matches_image_text_features(clip_model, images, tmp_path):
    ids = tokens()
    with torch.no_grad():
        ref_i = _features(clip_model.get_image_features(pixel_values=images))
        ref_t = _features(clip_model.get_text_features(input_ids=ids))
    model, config = convert_hf_clip_state_dict(clip_model.state_dict(), clip_model.config.to_dict())
    assert config["text"]["eot_id"] == 99 and config["text"]["act"] == "quick_gelu" and config["embed_dim"] == 24
    with torch.no_grad():
        assert (model.encode_image(images, normalize=False) - ref_i).abs().max().item() < TOL
        assert (model.encode_text(ids, normalize=False) - ref_t).abs().max().item() < TOL
    assert torch.equal(model.logit_scale.detach(), clip_model.logit_scale.detach().reshape(1))
    clip_model.save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), "--out", str(tmp_path / "export")]) == 0
    loaded, cfg = load_export(tmp_path / "export")
    assert cfg["kind"] == "clip" and cfg["text_tokenizer"] is None  # vocab 100, no tokenizer files
    with torch.no_grad():
        assert (loaded.encode_text(ids, normalize=False) - ref_t).abs().max().item() < TOL
    vision_only, cfg = load_hf_clip(tmp_path / "hf", vision_only=True)
    with torch.no_grad():
        ref_pool = clip_model.vision_model(pixel_values=images).pooler_output
    assert "text" not in cfg and (vision_only(images) - ref_pool).abs().max().item() < TOL


def test_legacy_eos_2_pools_at_argmax(images):
    torch.manual_seed(0)
    hf = perturb(transformers.CLIPModel(transformers.CLIPConfig(
        text_config={**TEXT, "eos_token_id": 2, "bos_token_id": 1}, vision_config=VISION, projection_dim=24)))
    ids = tokens()
    with torch.no_grad():
        ref = _features(hf.get_text_features(input_ids=ids))
    model, config = convert_hf_clip_state_dict(hf.state_dict(), hf.config.to_dict())
    assert config["text"]["eot_id"] is None
    with torch.no_grad():
        assert (model.encode_text(ids, normalize=False) - ref).abs().max().item() < TOL


def test_errors(clip_model):
    state, cfg = clip_model.state_dict(), clip_model.config.to_dict()
    with pytest.raises(ValueError, match="missing keys: text_projection.weight"):
        convert_hf_clip_state_dict({k: v for k, v in state.items() if k != "text_projection.weight"}, cfg)
    with pytest.raises(ValueError, match=r"unexpected Hugging Face CLIP keys: vision_model\.encoder\.layers\.0\.ad"):
        convert_hf_clip_state_dict({**state, "vision_model.encoder.layers.0.adapter.weight": torch.zeros(2)}, cfg)
    with pytest.raises(ValueError, match=r"missing keys: vision_model\.encoder\.layers\.1\.layer_norm2\.weight"):
        convert_hf_clip_state_dict({k: v for k, v in state.items()
                                    if k != "vision_model.encoder.layers.1.layer_norm2.weight"}, cfg)
    with pytest.raises(ValueError, match="expected a CLIP"):
        convert_hf_clip_state_dict(state, {"model_type": "vit"})


def test_mlp_widths_that_float_ratios_round_off(images):
    """int(56 * (61 / 56)) == 60: the text and vision towers both rebuild the exact MLP width."""
    torch.manual_seed(0)
    text = {**TEXT, "hidden_size": 56, "intermediate_size": 61}
    vision = {**VISION, "hidden_size": 56, "intermediate_size": 61}
    hf = perturb(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                projection_dim=24)))
    ids = tokens()
    with torch.no_grad():
        ref_i = _features(hf.get_image_features(pixel_values=images))
        ref_t = _features(hf.get_text_features(input_ids=ids))
    model, _ = convert_hf_clip_state_dict(hf.state_dict(), hf.config.to_dict())
    with torch.no_grad():
        assert (model.encode_image(images, normalize=False) - ref_i).abs().max().item() < TOL
        assert (model.encode_text(ids, normalize=False) - ref_t).abs().max().item() < TOL

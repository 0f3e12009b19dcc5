"""clipdino encoder -> native transformers vision model: per-mapping parity (tokens, layer -2, pooled CLS, other
image sizes), the image processor against our eval transform, the CLI read back in a process with no clipdino
module, and the refusals."""
import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.transforms import EvalTransform  # noqa: E402
from models.clip import CLIP  # noqa: E402
from models.convert.to_hf import (hf_vision_from_vit, image_processor_for, main,  # noqa: E402
                                  training_image_stats)
from models.export import save_export  # noqa: E402
from models.text import TextTowerConfig, TextTransformer  # noqa: E402
from models.vit import ViTConfig, VisionTransformer  # noqa: E402

TOL = 1e-5
SIZE = 32
CASES = {  # name: (ViTConfig options, transformers model_type)
    "clip_patch_bias_quick_gelu": (dict(pre_norm=True, patch_bias=True, act="quick_gelu", norm_eps=1e-5),
                                   "clip_vision_model"),
    "clip_no_qkv_bias": (dict(pre_norm=True, patch_bias=False, qkv_bias=False, norm_eps=1e-5), "clip_vision_model"),
    "vit": (dict(), "vit"),
    "vit_no_biases": (dict(qkv_bias=False, patch_bias=False, act="quick_gelu"), "vit"),
    "dinov2_layer_scale": (dict(layer_scale=0.1), "dinov2"),
    "dinov2_with_registers": (dict(layer_scale=0.1, num_registers=3), "dinov2_with_registers"),
    "registers_without_layer_scale": (dict(num_registers=2), "dinov2_with_registers"),
}


def tiny_vit(seed: int = 0, **options) -> VisionTransformer:
    """Random tiny ViT with every parameter perturbed (zero biases / unit norms would hide a dropped tensor)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(ViTConfig(size="micro", width=32, depth=3, heads=2, patch_size=8, image_size=SIZE,
                                      **options)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return vit


def to_hf(vit: VisionTransformer, **kw):
    config, state = hf_vision_from_vit(vit, **kw)
    model = transformers.AutoModel.from_config(config).eval()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def our_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    f = vit.forward_features(x)
    return torch.cat([f["cls"][:, None], f["registers"], f["patch"]], dim=1)  # (B, 1+R+N, W)


def hf_tokens(model, x: torch.Tensor, **kw):
    out = model(pixel_values=x, output_hidden_states=True, **kw)
    last = out.last_hidden_state
    if model.config.model_type == "clip_vision_model":  # CLIP's last_hidden_state is before post_layernorm
        last = model.post_layernorm(last)
    return last, out


@pytest.mark.parametrize("name", CASES)
def test_parity(name):
    options, model_type = CASES[name]
    vit = tiny_vit(**options)
    model = to_hf(vit)
    assert model.config.model_type == model_type
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        last, out = hf_tokens(model, x)
        ours = our_tokens(vit, x)
        assert last.shape == ours.shape == (2, 1 + vit.cfg.num_registers + 16, 32)
        assert (last - ours).abs().max().item() < TOL
        assert len(out.hidden_states) == vit.cfg.depth + 1  # embeddings, then each block
        assert (out.hidden_states[-2] - vit.forward_intermediates(x, [-2])[0]).abs().max().item() < TOL
        assert (out.pooler_output - vit(x)).abs().max().item() < TOL  # our CLS feature


@pytest.mark.parametrize("name", ["clip_patch_bias_quick_gelu", "vit", "dinov2_layer_scale"])
def test_other_image_size(name):
    """Position tables resized the same way (the folded CLIP patch bias survives bicubic resizing)."""
    vit = tiny_vit(**CASES[name][0])
    model = to_hf(vit)
    x = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(8))
    kw = {"interpolate_pos_encoding": True} if name != "dinov2_layer_scale" else {}
    with torch.no_grad():
        assert (hf_tokens(model, x, **kw)[0] - our_tokens(vit, x)).abs().max().item() < TOL


def test_a_swapped_tensor_shows():
    """The parity check is sensitive: q and k exchanged in one block breaks it."""
    vit = tiny_vit(**CASES["clip_patch_bias_quick_gelu"][0])
    model = to_hf(vit)
    attn = model.encoder.layers[1].self_attn
    with torch.no_grad():
        q = attn.q_proj.weight.clone()
        attn.q_proj.weight.copy_(attn.k_proj.weight)
        attn.k_proj.weight.copy_(q)
        x = torch.randn(2, 3, SIZE, SIZE)
        assert (hf_tokens(model, x)[0] - our_tokens(vit, x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["clip_patch_bias_quick_gelu", "vit", "dinov2_layer_scale"])
def test_llava_image_features_are_our_layer_minus_2_patches(name):
    """LlavaForConditionalGeneration (layer -2, strategy "default") sees our layer -2 patch tokens."""
    vit = tiny_vit(**CASES[name][0])
    vision_config, state = hf_vision_from_vit(vit, purpose="llava")
    text_config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2)
    llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=63, vision_feature_layer=-2,
        vision_feature_select_strategy="default")).eval()
    llava.model.vision_tower.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got = torch.stack(llava.model.get_image_features(pixel_values=x).pooler_output)  # (B, N, 48)
        want = llava.model.multi_modal_projector(vit.forward_intermediates(x, [-2])[0][:, 1:])
    assert got.shape == (2, 16, 48) and (got - want).abs().max().item() < TOL


def test_keeps_the_vit_dtype():
    vit = tiny_vit(pre_norm=True).to(torch.bfloat16)
    _, state = hf_vision_from_vit(vit)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


@pytest.mark.parametrize("options", [dict(pre_norm=True), dict(), dict(layer_scale=0.1)])
def test_image_processor_matches_eval_transform(options):
    vit = tiny_vit(**options)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    processor = image_processor_for(vit, mean, std)
    img = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    got = processor(images=img, return_tensors="pt").pixel_values[0]
    assert got.shape == (3, SIZE, SIZE)
    assert (got - EvalTransform(SIZE, mean, std)(img)).abs().max().item() < 1e-5


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match="num_registers=2 with pre_norm"):
        hf_vision_from_vit(tiny_vit(pre_norm=True, num_registers=2))
    with pytest.raises(ValueError, match="layer_scale=0.1 with pre_norm"):
        hf_vision_from_vit(tiny_vit(pre_norm=True, layer_scale=0.1))
    with pytest.raises(ValueError, match="mlp_ratio=2.5"):
        hf_vision_from_vit(tiny_vit(layer_scale=0.1, mlp_ratio=2.5))
    with pytest.raises(ValueError, match="num_registers=3: LLaVA"):
        hf_vision_from_vit(tiny_vit(num_registers=3, layer_scale=0.1), purpose="llava")
    with pytest.raises(ValueError, match="unknown purpose"):
        hf_vision_from_vit(tiny_vit(), purpose="vlm")
    config, _ = hf_vision_from_vit(tiny_vit(pre_norm=True), purpose="llava")
    assert config.model_type == "clip_vision_model"
    assert to_hf(tiny_vit(mlp_ratio=2.5)).config.intermediate_size == 80  # ViT takes any MLP width


def test_training_image_stats_rule(tmp_path):
    assert training_image_stats({"image_mean": [0.1] * 3, "image_std": [0.2] * 3})[:2] == ([0.1] * 3, [0.2] * 3)
    (tmp_path / "config.yaml").write_text("data:\n  mean: [0.3, 0.3, 0.3]\n  std: [0.4, 0.4, 0.4]\n")
    mean, std, source = training_image_stats({"meta": {"run_dir": str(tmp_path)}})
    assert (mean, std, source) == ([0.3] * 3, [0.4] * 3, str(tmp_path / "config.yaml"))
    assert training_image_stats({"meta": {}})[2] == "OpenAI CLIP default"


# ---------------------------------------------------------------------------------------------------- CLI
READ_BACK = """
import json, sys, torch
from pathlib import Path
from transformers import AutoImageProcessor, AutoModel
root, folders = Path(sys.argv[1]), sys.argv[2:]
img = torch.load(root / "image.pt", weights_only=True)
out = {}
for name in folders:
    model = AutoModel.from_pretrained(root / name).eval()
    pixels = AutoImageProcessor.from_pretrained(root / name)(images=img, return_tensors="pt").pixel_values
    with torch.no_grad():
        o = model(pixel_values=pixels, output_hidden_states=True)
    last = model.post_layernorm(o.last_hidden_state) if model.config.model_type == "clip_vision_model" \\
        else o.last_hidden_state
    out[name] = {"type": type(model).__name__, "last": last, "layer_minus_2": o.hidden_states[-2]}
repo = {"models", "train", "data", "eval", "kernels", "launch", "benchmarks"}
out["clipdino_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in repo)
torch.save(out, root / "out.pt")
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("to_hf")
    dino = tiny_vit(layer_scale=0.1)
    save_export(root / "vit_export", dino, "vit", {"vision": asdict(dino.cfg), "image_mean": [0.5, 0.4, 0.3],
                                                  "image_std": [0.2, 0.25, 0.3]})
    visual = tiny_vit(pre_norm=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5, seed=3)
    clip = CLIP(visual, TextTransformer(TextTowerConfig(vocab_size=50, width=32, heads=2, layers=1,
                                                        context_length=8)), 16)
    save_export(root / "clip_export", clip, "clip", {
        "vision": asdict(visual.cfg), "embed_dim": 16, "text": {"type": "transformer", **asdict(clip.text.cfg)},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]})
    return {"root": root, "vit": (dino, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]),
            "clip": (visual, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])}


def test_cli_round_trip_in_a_process_without_clipdino(exports, capsys):
    root = exports["root"]
    for kind in ("vit", "clip"):
        assert main([str(root / f"{kind}_export"), "--out", str(root / f"{kind}_hf")]) == 0
        assert "mean/std from the export" in capsys.readouterr().out
        assert {p.name for p in (root / f"{kind}_hf").iterdir()} >= {"config.json", "model.safetensors",
                                                                     "preprocessor_config.json"}
    img = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8, generator=torch.Generator().manual_seed(10))
    torch.save(img, root / "image.pt")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", READ_BACK, str(root), "vit_hf", "clip_hf"], cwd=root, env=env, check=True,
                   timeout=300)
    out = torch.load(root / "out.pt", weights_only=True)
    assert out["clipdino_modules"] == []
    assert out["vit_hf"]["type"] == "Dinov2Model" and out["clip_hf"]["type"] == "CLIPVisionModel"
    for kind in ("vit", "clip"):
        vit, mean, std = exports[kind]
        x = EvalTransform(SIZE, mean, std)(img)[None]
        with torch.no_grad():
            assert (out[f"{kind}_hf"]["last"] - our_tokens(vit, x)).abs().max().item() < TOL
            assert (out[f"{kind}_hf"]["layer_minus_2"] - vit.forward_intermediates(x, [-2])[0]).abs().max() < TOL
    processor = json.loads((root / "clip_hf" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "CLIPImageProcessor" and processor["crop_size"]["height"] == SIZE


def test_cli_errors_are_one_line(exports, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "no such export folder" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert main([str(tmp_path / "other"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a clipdino export" in err and len(err.strip().splitlines()) == 1
    reg = tiny_vit(num_registers=2)
    save_export(tmp_path / "reg", reg, "vit", {"vision": asdict(reg.cfg)})
    assert main([str(tmp_path / "reg"), "--out", str(tmp_path / "out"), "--purpose", "llava"]) == 2
    err = capsys.readouterr().err
    assert "num_registers=2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_out_folder_is_replaced_only_when_it_is_an_earlier_output(exports, tmp_path, capsys):
    export = str(exports["root"] / "vit_export")
    assert main([export, "--out", str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    assert main([export, "--out", str(tmp_path / "hf"), "--image-mean", "0.1", "0.2", "0.3"]) == 0  # replaced whole
    assert not (tmp_path / "hf" / "model-00001-of-00002.safetensors").exists()
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.1, 0.2, 0.3] and processor["image_std"] == [0.2, 0.25, 0.3]  # std: export's
    assert processor["image_processor_type"] == "BitImageProcessor"
    assert "mean/std from --image-mean / --image-std, else the export" in capsys.readouterr().out
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert main([export, "--out", str(tmp_path / "hf")]) == 2
    assert "notes.txt" in capsys.readouterr().err and (tmp_path / "hf" / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left

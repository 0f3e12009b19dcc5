"""Hugging Face ViTModel -> clipdino `vit` export: parity (transformers 5.x and 4.x key layouts), folder CLI, errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from models.convert.hf_vit import convert_hf_vit_state_dict, load_hf_vit, main  # noqa: E402
from models.export import load_export  # noqa: E402

TOL = 1e-5
LEGACY = [  # transformers 5.x key -> the 4.x name (what the study's Hugging Face DINO checkpoint files hold)
    ("layers.", "encoder.layer."), (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."), (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."), (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense.")]


def legacy(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for new, old in LEGACY:
            key = key.replace(new, old) if key.startswith("layers.") or new != "layers." else key
        out[key] = value
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8, layer_norm_eps=1e-6)
    model = transformers.ViTModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406],
                                                                 "image_std": [0.229, 0.224, 0.225]}))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state[:, 0]  # CLS after the final layernorm
    return {"model": model, "folder": folder, "x": x, "ref": ref}


def test_matches_last_hidden_state_cls(hf):
    vit, config = convert_hf_vit_state_dict(hf["model"].state_dict(), hf["model"].config.to_dict())
    assert config["vision"]["heads"] == 4 and config["vision"]["norm_eps"] == 1e-6 and config["vision"]["act"] == "gelu"
    assert "pooler.dense.weight" in config["dropped_keys"]
    assert (vit(hf["x"]) - hf["ref"]).abs().max().item() < TOL


def test_transformers_4_layout(hf, tmp_path):
    """The 4.x names are the ones transformers itself maps from: check against its own loader too."""
    state = legacy(hf["model"].state_dict())
    assert "encoder.layer.0.attention.attention.query.weight" in state
    vit, _ = convert_hf_vit_state_dict(state, hf["model"].config.to_dict())
    assert (vit(hf["x"]) - hf["ref"]).abs().max().item() < TOL
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf["folder"] / "config.json").read_text())
    reloaded = transformers.ViTModel.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert (reloaded(pixel_values=hf["x"]).last_hidden_state[:, 0] - hf["ref"]).abs().max().item() < TOL


def test_folder_cli_round_trip(hf, tmp_path):
    assert main([str(hf["folder"]), "--out", str(tmp_path / "export")]) == 0
    model, config = load_export(tmp_path / "export")
    assert config["kind"] == "vit" and config["image_std"] == [0.229, 0.224, 0.225]
    with torch.no_grad():
        assert (model(hf["x"]) - hf["ref"]).abs().max().item() < TOL
    vit, _ = load_hf_vit(hf["folder"] / "model.safetensors")  # a weight file: config.json from its folder
    assert (vit(hf["x"]) - hf["ref"]).abs().max().item() < TOL


def test_errors(hf, tmp_path, capsys):
    state, cfg = hf["model"].state_dict(), hf["model"].config.to_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("layers.1.attention.k_proj")}
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.q_proj\.(weight|bias) but not its k"):
        convert_hf_vit_state_dict(broken, cfg)
    with pytest.raises(ValueError, match=r"unexpected Hugging Face ViT keys: layers\.0\.attention\.rotary"):
        convert_hf_vit_state_dict({**state, "layers.0.attention.rotary.inv_freq": torch.zeros(2)}, cfg)
    with pytest.raises(ValueError, match=r"missing keys: layers\.1\.layernorm_after\.weight"):
        convert_hf_vit_state_dict({k: v for k, v in state.items() if k != "layers.1.layernorm_after.weight"}, cfg)
    old = {k: v for k, v in legacy(state).items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match=r"missing keys: encoder\.layer\.1\.output\.dense\.bias"):
        convert_hf_vit_state_dict(old, cfg)
    with pytest.raises(ValueError, match=r"hidden_act='gelu_new'"):
        convert_hf_vit_state_dict(state, {**cfg, "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="config disagrees with the weights: num_hidden_layers=3"):
        convert_hf_vit_state_dict(state, {**cfg, "num_hidden_layers": 3})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert main([str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # no weights in the folder
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.safetensors" in err and "\n" not in err

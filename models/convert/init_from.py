"""Start pretraining from a converted (or earlier) export: copy its vision tower into a fresh ViT, strictly.

    vit = VisionTransformer(vit_config_from(cfg.model.vision))
    init_vision_from_export(vit, "exports/dino_b16")   # kind vit: the ViT; kind clip: its visual tower

Every architectural field that shapes the weights or the computation must agree (width, depth, heads, patch,
MLP ratio, qkv / patch biases, layer scale, registers, pre-norm, activation, LayerNorm eps); a different image
size is allowed: the position table is resized (bicubic, as at evaluation). Text towers and projections are
not copied (a CLIP objective starts those fresh).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.export import load_export
from models.vit import VisionTransformer

MUST_MATCH = ("width", "depth", "heads", "patch_size", "mlp_ratio", "qkv_bias", "patch_bias", "num_registers",
              "pre_norm", "act", "norm_eps")


def init_vision_from_export(vit: VisionTransformer, export_dir: str | Path) -> dict[str, Any]:
    """Load the export's vision weights into `vit` in place; returns the export's config."""
    model, config = load_export(export_dir)
    source: VisionTransformer = model.visual if config["kind"] == "clip" else model
    ours, theirs = vit.cfg, source.cfg
    wrong = [f"{k}: export {getattr(theirs, k)!r}, model {getattr(ours, k)!r}" for k in MUST_MATCH
             if getattr(theirs, k) != getattr(ours, k)]
    if bool(theirs.layer_scale) != bool(ours.layer_scale):
        wrong.append(f"layer_scale: export {theirs.layer_scale!r}, model {ours.layer_scale!r}")
    if wrong:
        raise ValueError(f"cannot initialise from {export_dir}: architecture differs ({'; '.join(wrong)})")
    state = source.state_dict()
    if source.grid != vit.grid:
        with torch.no_grad():
            state["pos_embed"] = source.interpolate_pos_embed(vit.grid, vit.grid).clone()
    vit.load_state_dict(state, strict=True)
    return config

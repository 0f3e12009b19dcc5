"""The encoder export format: `model.safetensors` + `config.json` (+ `tokenizer.model`), nothing else.

    save_export("runs/x/export/step_0000100", module, kind="clip", config={...})
    model, config = load_export("runs/x/export/step_0000100")

`kind` is "vit" (a VisionTransformer) or "clip" (a CLIP model). `config.json` rebuilds the module
without the training config. A frozen Hugging Face text tower is referenced by path, not copied (only the parts
of it that trained, `model.frozen_text.unfrozen_layers` / `freeze_layer_norm=false`, are in the weights file).
Writes are atomic: the folder appears complete (rename of a finished temp folder) or not at all,
so an evaluation watcher never reads a partial export.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.atomic import atomic_folder
from models.vit import ViTConfig, VisionTransformer

FORMAT = "clipdino-export"
VERSION = 1
FROZEN_PREFIX = "text.encoder."  # weights of a frozen HF text tower: loaded from its own folder


def frozen_keys(module: nn.Module) -> set[str]:
    """State keys under FROZEN_PREFIX that did not train (requires_grad False): read from the tower's folder."""
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k for k in module.state_dict() if k.startswith(FROZEN_PREFIX) and k not in trained}


def save_export(out_dir: str | Path, module: nn.Module, kind: str, config: dict[str, Any],
                meta: dict[str, Any] | None = None) -> Path:
    out_dir = Path(out_dir)
    if kind not in ("vit", "clip"):
        raise ValueError(f"unknown export kind {kind!r}")
    frozen = frozen_keys(module)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items() if k not in frozen}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to export non-finite weights ({bad[0]} and {len(bad) - 1} more)")
    full = {"format": FORMAT, "version": VERSION, "kind": kind, **config, "meta": meta or {}}
    tokenizer = config.get("tokenizer")
    with atomic_folder(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        if tokenizer:  # make the export self-contained
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            full["tokenizer"] = "tokenizer.model"
        (tmp / "config.json").write_text(json.dumps(full, indent=2))
    return out_dir


def build_from_config(config: dict[str, Any]) -> nn.Module:
    vision = VisionTransformer(ViTConfig(**config["vision"]))
    if config["kind"] == "vit":
        return vision
    from models.clip import CLIP, text_projection

    text_cfg = dict(config["text"])
    kind = text_cfg.pop("type")
    text_proj = None
    if kind == "hf_frozen":
        from models.hf_text import FrozenHFTextTower

        text = FrozenHFTextTower(text_cfg["path"], text_cfg["pooling"], text_cfg["max_length"],
                                 unfrozen_layers=text_cfg.get("unfrozen_layers", 0),
                                 freeze_layer_norm=text_cfg.get("freeze_layer_norm", True))
        text_proj = text_projection(text.width, config["embed_dim"], text_cfg.get("proj_type", "linear"))
    else:
        from models.text import TextTowerConfig, TextTransformer

        text = TextTransformer(TextTowerConfig(**text_cfg))
    return CLIP(vision, text, config["embed_dim"], max_logit_scale=config.get("max_logit_scale", 100.0),
                init_logit_bias=0.0 if config.get("has_logit_bias") else None, text_proj=text_proj)


def load_export(folder: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a clipdino export (needs config.json and model.safetensors)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: not a clipdino export (format={config.get('format')!r})")
    model = build_from_config(config)
    state = load_file(str(weights), device=map_location)
    frozen = frozen_keys(model)
    expected = {k for k in model.state_dict() if k not in frozen}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights}: layout mismatch; missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    if config.get("tokenizer"):
        config["tokenizer_path"] = str(folder / config["tokenizer"])
    return model.eval(), config

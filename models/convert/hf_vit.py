"""Convert Hugging Face `ViTModel` checkpoints (e.g. the study's DINO release) into clipdino `vit` exports.

    python -m models.convert.hf_vit ~/hf/Leonardo6/dino-datacomp-12m-16 --out exports/dino_datacomp_b16
    vit, config = convert_hf_vit_state_dict(hf_model.state_dict(), hf_model.config.to_dict())

Reads a model folder (`config.json` + `model.safetensors` / `pytorch_model.bin`, sharded or not, loaded with
safetensors or `torch.load(weights_only=True)`) or a weight file with `config=...`. Both key layouts are
accepted: transformers 4.x (`encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...) and 5.x
(`layers.N.attention.q_proj`, `mlp.fc1`, ...); a `vit.` prefix (ViTForImageClassification) is stripped.
The CLS feature clipdino returns is `last_hidden_state[:, 0]` (after the final `layernorm`); the pooler
(dense + tanh), the classifier and the unused `mask_token` are dropped. Heads, LayerNorm eps (HF ViT default
1e-12) and the activation come from the config; `hidden_act` other than gelu / quick_gelu is refused.
Image mean / std come from `preprocessor_config.json` when present, else ImageNet's.
"""
from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from models.convert.common import (HF_CHECKPOINT_HELP, HF_CONFIG_HELP, build_vit, complete_hf_config,
                                   converter_parser, fuse_qkv, hf_preprocess, namer, read_json,
                                   read_weights, rename_keys, require_tensors, run_cli, short, strip_prefixes,
                                   vit_config_from_weights, vit_summary)
from models.export import save_export
from models.transformer import ACTIVATIONS
from models.vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_B = r"^(?:encoder\.layer|layers)\.(\d+)\."
RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.\1"),
    (_B + r"attention\.attention\.query\.(weight|bias)$", r"blocks.\1.attn.q.\2"),  # transformers 4.x
    (_B + r"attention\.attention\.key\.(weight|bias)$", r"blocks.\1.attn.k.\2"),
    (_B + r"attention\.attention\.value\.(weight|bias)$", r"blocks.\1.attn.v.\2"),
    (_B + r"attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (_B + r"intermediate\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (_B + r"output\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (_B + r"attention\.(q|k|v)_proj\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),  # transformers 5.x
    (_B + r"attention\.o_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (_B + r"mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (_B + r"layernorm_before\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (_B + r"layernorm_after\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]
_NEW, _OLD = r"layers.\1.attention.", r"encoder.layer.\1.attention."
_INV_EMBED = [(r"^cls_token$", "embeddings.cls_token"), (r"^pos_embed$", "embeddings.position_embeddings"),
              (r"^patch_embed\.(\w+)$", r"embeddings.patch_embeddings.projection.\1")]
_INV_NORM = (r"^norm\.(\w+)$", r"layernorm.\1")
INVERSE = {  # clipdino key -> HF name, per layout (for "missing key" messages)
    "5.x": [*_INV_EMBED,
            (r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$", _NEW + r"{q,k,v}_proj.\2"),
            (r"^blocks\.(\d+)\.attn\.proj\.(\w+)$", _NEW + r"o_proj.\2"),
            (r"^blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)$", r"layers.\1.mlp.\2.\3"),
            (r"^blocks\.(\d+)\.norm1\.(\w+)$", r"layers.\1.layernorm_before.\2"),
            (r"^blocks\.(\d+)\.norm2\.(\w+)$", r"layers.\1.layernorm_after.\2"), _INV_NORM],
    "4.x": [*_INV_EMBED,
            (r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$", _OLD + r"attention.{query,key,value}.\2"),
            (r"^blocks\.(\d+)\.attn\.proj\.(\w+)$", _OLD + r"output.dense.\2"),
            (r"^blocks\.(\d+)\.mlp\.fc1\.(\w+)$", r"encoder.layer.\1.intermediate.dense.\2"),
            (r"^blocks\.(\d+)\.mlp\.fc2\.(\w+)$", r"encoder.layer.\1.output.dense.\2"),
            (r"^blocks\.(\d+)\.norm1\.(\w+)$", r"encoder.layer.\1.layernorm_before.\2"),
            (r"^blocks\.(\d+)\.norm2\.(\w+)$", r"encoder.layer.\1.layernorm_after.\2"), _INV_NORM]}
DROPPED = re.compile(r"^(pooler\.|classifier\.|embeddings\.mask_token$)")


def hf_activation(name: Any, what: str) -> str:
    """HF `hidden_act` -> the blocks' `act` (the same names); anything else is refused."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{what} hidden_act={name!r} is not supported (clipdino has {', '.join(ACTIVATIONS)})")
    return name


def convert_hf_vit_state_dict(state: dict[str, Any], hf_config: dict[str, Any], *,
                              image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD
                              ) -> tuple[VisionTransformer, dict[str, Any]]:
    """HF ViTModel state dict + its config dict -> (clipdino VisionTransformer in eval mode, `vit` export config)."""
    if hf_config.get("model_type", "vit") != "vit":
        raise ValueError(f"config model_type={hf_config.get('model_type')!r}: expected a ViTModel ('vit') config")
    state = require_tensors(strip_prefixes(state, ("module.", "vit.")), "Hugging Face ViT")
    converted, sources, unknown, dropped = rename_keys(state, RULES, DROPPED)
    if unknown:
        raise ValueError(f"unexpected Hugging Face ViT keys: {short(unknown)}")
    converted = fuse_qkv(converted, sources)
    for key, shape_fix in (("cls_token", lambda t: t.reshape(1, 1, -1)), ("pos_embed", lambda t: t.reshape(
            1, -1, t.shape[-1]))):
        if key in converted:
            converted[key] = shape_fix(converted[key])
    source = namer(sources, INVERSE["4.x" if any(k.startswith("encoder.layer.") for k in state) else "5.x"])
    heads = int(hf_config.get("num_attention_heads", 12))
    cfg = vit_config_from_weights(converted, heads=heads, norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
                                  act=hf_activation(hf_config.get("hidden_act", "gelu"), "ViT"), source=source)
    found = {"hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "patch_size": cfg.patch_size,
             "image_size": cfg.image_size}
    wrong = [f"{k}={hf_config[k]} but the weights have {v}" for k, v in found.items()
             if k in hf_config and hf_config[k] != v]
    if wrong:
        raise ValueError(f"config disagrees with the weights: {'; '.join(wrong)}")
    vit = build_vit(converted, cfg, "Hugging Face ViT", source)
    config = {"vision": asdict(vit.cfg), "image_mean": [float(x) for x in image_mean],
              "image_std": [float(x) for x in image_std], "dropped_keys": short(dropped) if dropped else ""}
    return vit, config


def load_hf_vit(path: str | Path, config_path: Optional[str | Path] = None,
                image_mean: Optional[Sequence[float]] = None, image_std: Optional[Sequence[float]] = None
                ) -> tuple[VisionTransformer, dict[str, Any]]:
    """An HF model folder, or a weight file + `config_path` -> (VisionTransformer, export config)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    hf_config = complete_hf_config(read_json(Path(config_path) if config_path else folder / "config.json",
                                          "Hugging Face config.json"))
    pre = hf_preprocess(folder)
    return convert_hf_vit_state_dict(read_weights(path), hf_config,
                                     image_mean=image_mean or pre.get("image_mean") or IMAGENET_MEAN,
                                     image_std=image_std or pre.get("image_std") or IMAGENET_STD)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = converter_parser("Convert a Hugging Face ViTModel into a clipdino vit export.", HF_CHECKPOINT_HELP,
                              "preprocessor_config.json / ImageNet")
    parser.add_argument("--config", help=HF_CONFIG_HELP)
    args = parser.parse_args(argv)

    def convert() -> tuple[Path, str]:
        vit, config = load_hf_vit(args.checkpoint, args.config, args.image_mean, args.image_std)
        meta = {"source": str(args.checkpoint), "converted_from": "hf_vit", "dropped": config["dropped_keys"]}
        out = save_export(args.out, vit, "vit", config, meta=meta)
        dropped = f"; dropped {config['dropped_keys']}" if config["dropped_keys"] else ""
        return out, vit_summary(config["vision"]) + dropped

    return run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())

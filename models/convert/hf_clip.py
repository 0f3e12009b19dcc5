"""Convert Hugging Face `CLIPVisionModel` / `CLIPModel` checkpoints into clipdino exports.

    python -m models.convert.hf_clip ~/hf/Leonardo6/clip-datacomp-12m-16 --out exports/clip_datacomp_b16
    python -m models.convert.hf_clip ~/hf/openai/clip-vit-base-patch16 --out exports/openai_b16 [--vision-only]

A `CLIPModel` (vision + text towers + projections + logit scale) becomes a `clip` export; a `CLIPVisionModel`
(or `CLIPVisionModelWithProjection`, or a CLIPModel with `--vision-only`) becomes a `vit` export of the image
tower. Keys with or without the `vision_model.` / `text_model.` prefixes (transformers 4.x / 5.x) are read.
The feature clipdino returns is HF's `pooler_output`: `post_layernorm(last_hidden_state[:, 0])`. Activation
(`hidden_act`: quick_gelu for OpenAI-style weights, gelu), LayerNorm eps, head counts and the text pooling
token (`eos_token_id`: 2 = argmax of the ids as in HF's legacy path, else its first occurrence) come from the
config. Text: a 49,408-token vocabulary is OpenAI's CLIP BPE (`"text_tokenizer": "openai-clip-bpe"`,
tokenised with `open_clip.tokenize`); other vocabularies record the source folder's HF tokenizer
(`"text_tokenizer": "hf:FOLDER"`) when the folder holds one. Image mean / std: `preprocessor_config.json`,
else OpenAI CLIP's.
"""
from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from models.clip import CLIP
from models.convert.common import (HF_CHECKPOINT_HELP, HF_CONFIG_HELP, build_vit, complete_hf_config,
                                   converter_parser, fuse_qkv, hf_preprocess, load_strict,
                                   mlp_ratio_for, namer, read_json, read_weights, rename_keys, require_tensors,
                                   run_cli, short, strip_prefixes, vit_config_from_weights, vit_summary)
from models.convert.hf_vit import hf_activation
from models.export import save_export
from models.text import TextTowerConfig, TextTransformer
from models.vit import VisionTransformer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPENAI_VOCAB = 49408
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
_L = r"encoder\.layers\.(\d+)\."
_BLOCK = [(_L + r"self_attn\.(q|k|v)_proj\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),
          (_L + r"self_attn\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
          (_L + r"layer_norm1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
          (_L + r"layer_norm2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
          (_L + r"mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3")]
VISION_RULES = [(r"^embeddings\.class_embedding$", "cls_token"),
                (r"^embeddings\.patch_embedding\.weight$", "patch_embed.weight"),
                (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
                (r"^pre_layrnorm\.(weight|bias)$", r"norm_pre.\1"),
                (r"^post_layernorm\.(weight|bias)$", r"norm.\1"),
                *[("^" + p, r) for p, r in _BLOCK]]
TEXT_RULES = [(r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
              (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
              (r"^final_layer_norm\.(weight|bias)$", r"norm.\1"),
              *[("^" + p, r) for p, r in _BLOCK]]
_INV_BLOCK = [(r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$", r"encoder.layers.\1.self_attn.{q,k,v}_proj.\2"),
              (r"^blocks\.(\d+)\.attn\.proj\.(\w+)$", r"encoder.layers.\1.self_attn.out_proj.\2"),
              (r"^blocks\.(\d+)\.norm(\d)\.(\w+)$", r"encoder.layers.\1.layer_norm\2.\3"),
              (r"^blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)$", r"encoder.layers.\1.mlp.\2.\3")]
VISION_INVERSE = [(r"^cls_token$", "embeddings.class_embedding"),
                  (r"^patch_embed\.weight$", "embeddings.patch_embedding.weight"),
                  (r"^pos_embed$", "embeddings.position_embedding.weight"), (r"^norm_pre\.(\w+)$", r"pre_layrnorm.\1"),
                  (r"^norm\.(\w+)$", r"post_layernorm.\1"), *_INV_BLOCK]
TEXT_INVERSE = [(r"^token_embedding\.weight$", "embeddings.token_embedding.weight"),
                (r"^pos_embed$", "embeddings.position_embedding.weight"), (r"^norm\.(\w+)$", r"final_layer_norm.\1"),
                *_INV_BLOCK]
IGNORED = re.compile(r"(^|\.)position_ids$")  # a buffer in older transformers versions


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(vision keys, text keys, top-level keys), prefixes removed. Unprefixed tower keys are the vision tower
    (transformers 5.x CLIPVisionModel)."""
    vision, text, top = {}, {}, {}
    for key, value in state.items():
        if IGNORED.search(key):
            continue
        if key.startswith("vision_model."):
            vision[key[len("vision_model."):]] = value
        elif key.startswith("text_model."):
            text[key[len("text_model."):]] = value
        elif key in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
            top[key] = value
        else:
            vision[key] = value
    return vision, text, top


def _tower(state: dict[str, torch.Tensor], rules: list, prefix: str) -> tuple[dict, dict]:
    converted, sources, unknown, _ = rename_keys(state, rules)
    if unknown:
        raise ValueError(f"unexpected Hugging Face CLIP keys: {short([prefix + k for k in unknown])}")
    sources = {k: prefix + v for k, v in sources.items()}
    return fuse_qkv(converted, sources), sources


def _sub_config(hf_config: dict[str, Any], name: str) -> dict[str, Any]:
    if hf_config.get("model_type") == "clip":
        return hf_config.get(name) or {}
    if hf_config.get("model_type") in (f"clip_{name.split('_')[0]}_model", None):
        return hf_config
    raise ValueError(f"config model_type={hf_config.get('model_type')!r}: expected a CLIP ('clip' or "
                     f"'clip_vision_model') config")


def convert_hf_clip_state_dict(state: dict[str, Any], hf_config: dict[str, Any], *, vision_only: bool = False,
                               image_mean: Sequence[float] = OPENAI_MEAN, image_std: Sequence[float] = OPENAI_STD,
                               text_tokenizer: Optional[str] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """HF CLIP state dict + config dict -> (clipdino CLIP or VisionTransformer in eval mode, export config)."""
    state = require_tensors(strip_prefixes(state, ("module.",)), "Hugging Face CLIP")
    vision, text, top = _split(state)
    vcfg = _sub_config(hf_config, "vision_config")
    prefix = "vision_model." if text or top or any(k.startswith("vision_model.") for k in state) else ""
    converted, sources = _tower(vision, VISION_RULES, prefix)
    if "cls_token" in converted:
        converted["cls_token"] = converted["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in converted:
        converted["pos_embed"] = converted["pos_embed"].unsqueeze(0)
    source = namer(sources, VISION_INVERSE, prefix)
    vit_cfg = vit_config_from_weights(converted, heads=int(vcfg.get("num_attention_heads", 12)),
                                      norm_eps=float(vcfg.get("layer_norm_eps", 1e-5)),
                                      act=hf_activation(vcfg.get("hidden_act", "quick_gelu"), "vision"), source=source)
    mean_std = {"image_mean": [float(x) for x in image_mean], "image_std": [float(x) for x in image_std]}
    if vision_only or not text:
        dropped = sorted(top) + ([f"text_model.* ({len(text)} keys)"] if text else [])
        vit = build_vit(converted, vit_cfg, "Hugging Face CLIP vision", source)
        return vit, {"vision": asdict(vit.cfg), **mean_std, "dropped_keys": short(dropped) if dropped else ""}

    tcfg_hf = _sub_config(hf_config, "text_config")
    text_conv, text_sources = _tower(text, TEXT_RULES, "text_model.")
    missing_top = [k for k in ("visual_projection.weight", "text_projection.weight", "logit_scale") if k not in top]
    if missing_top:
        raise ValueError(f"Hugging Face CLIP checkpoint is missing keys: {', '.join(missing_top)}")
    if "token_embedding.weight" not in text_conv or "pos_embed" not in text_conv:
        raise ValueError("Hugging Face CLIP checkpoint is missing text_model.embeddings.* keys")
    vocab, width = text_conv["token_embedding.weight"].shape
    layers = 1 + max((int(k.split(".")[1]) for k in text_conv if k.startswith("blocks.")), default=-1)
    eos = tcfg_hf.get("eos_token_id", 2)
    text_cfg = TextTowerConfig(vocab_size=vocab, width=width, heads=int(tcfg_hf.get("num_attention_heads", 8)),
                               layers=layers, context_length=text_conv["pos_embed"].shape[0],
                               eot_id=None if eos == 2 else int(eos),
                               mlp_ratio=mlp_ratio_for(text_conv["blocks.0.mlp.fc1.weight"].shape[0], width),
                               norm_eps=float(tcfg_hf.get("layer_norm_eps", 1e-5)),
                               act=hf_activation(tcfg_hf.get("hidden_act", "quick_gelu"), "text"))
    embed_dim = top["visual_projection.weight"].shape[0]
    full = {**{f"visual.{k}": v for k, v in converted.items()}, **{f"text.{k}": v for k, v in text_conv.items()},
            "visual_proj.weight": top["visual_projection.weight"], "text_proj.weight": top["text_projection.weight"],
            "logit_scale": top["logit_scale"].reshape(1)}
    text_name = namer(text_sources, TEXT_INVERSE, "text_model.")
    top_names = {"visual_proj.weight": "visual_projection.weight", "text_proj.weight": "text_projection.weight"}

    def name(key: str) -> str:
        tower, _, rest = key.partition(".")
        return {"visual": source, "text": text_name}.get(tower, lambda k: top_names.get(key, key))(rest)

    clip = load_strict(lambda: CLIP(VisionTransformer(vit_cfg), TextTransformer(text_cfg), embed_dim,
                                    max_logit_scale=100.0), full, "Hugging Face CLIP", name)
    if text_tokenizer is None and vocab == OPENAI_VOCAB:
        text_tokenizer = "openai-clip-bpe"
    config = {"vision": asdict(clip.visual.cfg), "text": {"type": "transformer", **asdict(text_cfg)},
              "embed_dim": embed_dim, "max_logit_scale": 100.0, "has_logit_bias": False, "tokenizer": None,
              "text_tokenizer": text_tokenizer, **mean_std, "dropped_keys": ""}
    return clip, config


def load_hf_clip(path: str | Path, config_path: Optional[str | Path] = None, *, vision_only: bool = False,
                 image_mean: Optional[Sequence[float]] = None, image_std: Optional[Sequence[float]] = None
                 ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An HF model folder, or a weight file + `config_path` -> (module, export config)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    hf_config = complete_hf_config(read_json(Path(config_path) if config_path else folder / "config.json",
                                          "Hugging Face config.json"))
    pre = hf_preprocess(folder)
    tokenizer = f"hf:{folder.resolve()}" if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
    model, config = convert_hf_clip_state_dict(
        read_weights(path), hf_config, vision_only=vision_only,
        image_mean=image_mean or pre.get("image_mean") or OPENAI_MEAN,
        image_std=image_std or pre.get("image_std") or OPENAI_STD, text_tokenizer=None)
    if config.get("text") and config["text_tokenizer"] is None:
        config["text_tokenizer"] = tokenizer
    return model, config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = converter_parser("Convert a Hugging Face CLIPModel / CLIPVisionModel into a clipdino export (clip, or "
                              "vit for a vision tower).", HF_CHECKPOINT_HELP, "preprocessor_config.json / OpenAI CLIP")
    parser.add_argument("--config", help=HF_CONFIG_HELP)
    parser.add_argument("--vision-only", action="store_true", help="export only the image tower (kind vit)")
    args = parser.parse_args(argv)

    def convert() -> tuple[Path, str]:
        model, config = load_hf_clip(args.checkpoint, args.config, vision_only=args.vision_only,
                                     image_mean=args.image_mean, image_std=args.image_std)
        kind = "clip" if "text" in config else "vit"
        meta = {"source": str(args.checkpoint), "converted_from": "hf_clip", "dropped": config["dropped_keys"]}
        out = save_export(args.out, model, kind, config, meta=meta)
        summary = f"{kind}: {vit_summary(config['vision'])}"
        if kind == "clip":
            t = config["text"]
            summary += (f"; text width {t['width']} layers {t['layers']} context {t['context_length']}, embed "
                        f"{config['embed_dim']}, tokenizer {config['text_tokenizer']}")
        return out, summary + (f"; dropped {config['dropped_keys']}" if config["dropped_keys"] else "")

    return run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())

"""Convert open_clip ViT CLIP checkpoints into clipdino CLIP models and exports.

    model, config = load_open_clip_checkpoint("open_clip_pytorch_model.bin", "ViT-B-16.json")
    python -m models.convert.open_clip ckpt.pt --out exports/vit_b16 [--model-config ViT-B-16.json]

Supported: open_clip `CLIP` / `CustomTextCLIP` (own text transformer) with a plain ViT image tower (ln_pre
optional, layer scale, class-token pooling, SigLIP `logit_bias`); plain, DDP (`module.`) and training
({"state_dict": ...}) checkpoints, `.safetensors`. Weights become float32. Shapes give widths, depths, MLP
ratio, patch / image size, context, vocabulary and embed dim. Head counts are invisible in weights: they
come from the open_clip model config when given (width // head_width, text `heads`), else from the stock
configs (vision: `common.default_heads`, e.g. 16 for ViT-H's 1280; text: width // 64). Flags that change the computation but not the weights
(QuickGELU, avg pooling, non-causal text) are only visible in the config, so pass it for non-stock models:
`quick_gelu: true` (OpenAI-pretrained weights, the `-quickgelu` models) selects the blocks' QuickGELU.

Text: open_clip uses the OpenAI CLIP BPE tokenizer, which clipdino does not ship. Exports record
`"tokenizer": None`, `"text_tokenizer": "openai-clip-bpe"`; tokenise with `open_clip.tokenize`. Pooling at
argmax(token ids) (end-of-text is the largest id) is what our `eot_id=None` does.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from models.clip import CLIP
from models.convert.common import (converter_parser, load_strict, mlp_ratio_for, read_json, read_state_dict, run_cli,
                                   short)
from models.export import save_export
from models.text import TextTowerConfig, TextTransformer
from models.vit import VIT_SIZES, ViTConfig, VisionTransformer, default_heads

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORED_KEYS = {"attn_mask", "input_resolution", "context_length", "vocab_size"}  # buffers / OpenAI metadata
UNSUPPORTED: list[tuple[str, str]] = [  # (key pattern, what it means)
    (r"^visual\.trunk\.", "timm image tower (visual.trunk.*)"),
    (r"^visual\.(attnpool|layer\d|bn\d|conv[23])\.", "ModifiedResNet image tower"),
    (r"^visual\.attn_pool", "attentional pooler"),
    (r"^text_decoder\.", "CoCa multimodal text decoder"),
    (r"^text\.", "Hugging Face / custom text tower (text.*)"),
    (r"(^|\.)cls_emb$", "text class embedding (embed_cls)"),
    (r"\.attn\.(ln_q|ln_k|ln_inner|head_scale|logit_scale)\.?|\.ln_attn\.|\.mlp\.ln\.",
     "custom attention block (qk-norm / scaled-cosine / scale_* options)"),
    (r"^text_projection\.(weight|bias)$", "text projection with bias (proj_bias=True)"),
    (r"^transformer\.resblocks\.\d+\.ls_\d\.gamma$", "text layer scale (clipdino's text tower has none)"),
]
BLOCK_RENAMES = {"ln_1.": "norm1.", "ln_2.": "norm2.", "attn.in_proj_weight": "attn.qkv.weight",
                 "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj.": "attn.proj.", "ls_1.gamma": "ls1.gamma",
                 "ls_2.gamma": "ls2.gamma", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_same: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
_transpose: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.t()
TOP_RENAMES: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "visual.conv1.weight": ("visual.patch_embed.weight", _same),
    "visual.class_embedding": ("visual.cls_token", lambda t: t.reshape(1, 1, -1)),
    "visual.positional_embedding": ("visual.pos_embed", lambda t: t.unsqueeze(0)),
    **{f"visual.ln_pre.{p}": (f"visual.norm_pre.{p}", _same) for p in ("weight", "bias")},
    **{f"visual.ln_post.{p}": (f"visual.norm.{p}", _same) for p in ("weight", "bias")},
    "visual.proj": ("visual_proj.weight", _transpose),  # x @ proj == Linear with weight proj.T
    "token_embedding.weight": ("text.token_embedding.weight", _same),
    "positional_embedding": ("text.pos_embed", _same),
    **{f"ln_final.{p}": (f"text.norm.{p}", _same) for p in ("weight", "bias")},
    "text_projection": ("text_proj.weight", _transpose),
    "logit_scale": ("logit_scale", lambda t: t.reshape(1)),  # open_clip: shape (), ours (1,)
    "logit_bias": ("logit_bias", lambda t: t.reshape(1)),
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                "act_kwargs")  # model-config options that are unsupported when truthy
_VISION_FLAGS = ("attentional_pool", "timm_model_name", *_BLOCK_FLAGS)
_TEXT_FLAGS = ("hf_model_name", "embed_cls", "no_causal_mask", "proj_bias", "ls_init_value", *_BLOCK_FLAGS)


def _unwrap(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training-checkpoint wrapper, DDP / torch.compile prefixes, non-weight entries."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key in IGNORED_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"not an open_clip state dict: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    if "token_embedding.weight" not in out and "text.token_embedding.weight" in out:  # CustomTextCLIP, own tower
        out = {k[len("text."):] if k.startswith("text.") else k: v for k, v in out.items()}
    return out


def _unsupported_config(model_cfg: dict[str, Any]) -> list[str]:
    """Options of an open_clip model config that clipdino's CLIP cannot reproduce."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    found = [f"vision_cfg.{k}={vision[k]!r}" for k in _VISION_FLAGS if vision.get(k)]
    found += [f"text_cfg.{k}={text[k]!r}" for k in _TEXT_FLAGS if text.get(k)]
    found += ["vision_cfg.layers as a list (ModifiedResNet)"] if isinstance(vision.get("layers"), (list, tuple)) else []
    for name, cfg, key, allowed in (("vision_cfg", vision, "pool_type", ("tok",)), ("text_cfg", text, "pool_type",
                                    ("argmax", "eos")), ("text_cfg", text, "proj_type", ("linear",))):
        if cfg.get(key, allowed[0]) not in allowed:
            found.append(f"{name}.{key}={cfg[key]!r}")
    for name, cfg in (("vision_cfg", vision), ("text_cfg", text)):
        if set(cfg.get("norm_kwargs") or {}) - {"eps"}:
            found.append(f"{name}.norm_kwargs={cfg['norm_kwargs']}")
    return found


def _require(state: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"not a supported open_clip ViT checkpoint: missing key {key!r}")
    if state[key].ndim != ndim:
        raise ValueError(f"{key}: expected {ndim} dims, got shape {tuple(state[key].shape)}")
    return state[key]


def _depth_and_mlp_ratio(state: dict[str, torch.Tensor], prefix: str, width: int) -> tuple[int, float]:
    indices = [int(m.group(2)) for k in state if (m := _BLOCK_KEY.match(k)) and (m.group(1) or "") == prefix]
    if not indices:
        raise ValueError(f"no {prefix}transformer.resblocks.* keys: not an open_clip ViT CLIP checkpoint")
    hidden = _require(state, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", 2).shape[0]
    return max(indices) + 1, mlp_ratio_for(hidden, width)


def infer_configs(state: dict[str, torch.Tensor], model_cfg: Optional[dict[str, Any]] = None
                  ) -> tuple[ViTConfig, TextTowerConfig, int]:
    """(vision config, text config, embed dim) from tensor shapes (+ head counts / eps from `model_cfg`)."""
    vcfg, tcfg = (model_cfg or {}).get("vision_cfg", {}), (model_cfg or {}).get("text_cfg", {})
    act = "quick_gelu" if (model_cfg or {}).get("quick_gelu") else "gelu"
    conv = _require(state, "visual.conv1.weight", 4)
    width, patch = conv.shape[0], conv.shape[-1]
    if conv.shape[-2] != patch:
        raise ValueError(f"non-square patches {tuple(conv.shape[-2:])} are not supported")
    tokens = _require(state, "visual.positional_embedding", 2).shape[0] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"visual.positional_embedding has {tokens} patch positions: not a square grid")
    depth, mlp_ratio = _depth_and_mlp_ratio(state, "visual.", width)
    embed_dim = _require(state, "visual.proj", 2).shape[1]
    head_width = vcfg.get("head_width", 64) if model_cfg else width // default_heads(width, depth)
    if width % head_width:
        raise ValueError(f"vision width {width} is not a multiple of head width {head_width}")
    heads = width // head_width
    size = next((name for name, dims in VIT_SIZES.items() if dims == (width, depth, heads)), "base")
    has_ls = "visual.transformer.resblocks.0.ls_1.gamma" in state
    vision = ViTConfig(size=size, patch_size=patch, image_size=grid * patch, width=width, depth=depth, heads=heads,
                       mlp_ratio=mlp_ratio, qkv_bias=True, layer_scale=(vcfg.get("ls_init_value") or 1e-5) if has_ls
                       else None, pre_norm="visual.ln_pre.weight" in state or "visual.ln_pre.bias" in state,
                       norm_eps=(vcfg.get("norm_kwargs") or {}).get("eps", 1e-5), patch_bias=False, act=act)

    vocab, text_width = _require(state, "token_embedding.weight", 2).shape
    context = _require(state, "positional_embedding", 2).shape[0]
    layers, text_mlp_ratio = _depth_and_mlp_ratio(state, "", text_width)
    text_heads = tcfg.get("heads", 8) if model_cfg else max(1, text_width // 64)
    square = lambda v: v[0] if isinstance(v, (list, tuple)) and len(set(v)) == 1 else v  # noqa: E731
    wrong = [f"{tower}.{k}={cfg[k]} but the checkpoint has {v}" for tower, cfg, found in (
        ("vision_cfg", vcfg, {"width": width, "layers": depth, "patch_size": patch, "image_size": grid * patch}),
        ("text_cfg", tcfg, {"width": text_width, "layers": layers, "context_length": context, "vocab_size": vocab}))
        for k, v in found.items() if square(cfg.get(k, v)) != v]
    if wrong:
        raise ValueError(f"model config disagrees with the weights: {'; '.join(wrong)}")
    text = TextTowerConfig(vocab_size=vocab, width=text_width, heads=text_heads, layers=layers,
                           context_length=context, mlp_ratio=text_mlp_ratio,
                           eot_id=tcfg.get("eos_id", 2) if tcfg.get("pool_type") == "eos" else None,
                           norm_eps=(tcfg.get("norm_kwargs") or {}).get("eps", 1e-5), act=act)
    text_embed = _require(state, "text_projection", 2).shape[1]
    if text_embed != embed_dim or model_cfg and model_cfg.get("embed_dim", embed_dim) != embed_dim:
        raise ValueError(f"embed dims disagree: visual.proj {embed_dim}, text_projection {text_embed}, "
                         f"model config {(model_cfg or {}).get('embed_dim')}")
    return vision, text, embed_dim


def _rename(state: dict[str, torch.Tensor], copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """open_clip keys -> clipdino keys; returns (converted, clipdino key -> open_clip key, unknown keys)."""
    converted, source, unknown = {}, {}, []
    for key, value in state.items():
        new, fn = TOP_RENAMES.get(key, (None, _same))
        if new is None and (m := _BLOCK_KEY.match(key)):
            tower = "visual." if m.group(1) else "text."
            old = next((o for o in BLOCK_RENAMES if m.group(3).startswith(o)), None)
            if old is not None:
                new = f"{tower}blocks.{m.group(2)}.{BLOCK_RENAMES[old]}{m.group(3)[len(old):]}"
        if new is None:
            unknown.append(key)
            continue
        converted[new] = fn(value).to(torch.float32, copy=copy).contiguous()
        source[new] = key
    return converted, source, unknown


def _open_clip_name(key: str) -> str:
    """clipdino key -> the open_clip key it is converted from (for error messages)."""
    back = {new: old for old, new in BLOCK_RENAMES.items()}
    m = re.match(r"^(visual\.|text\.)blocks\.(\d+)\.(.+)$", key)
    new = next((n for n in back if m.group(3).startswith(n)), None) if m else None
    if new is None:
        return {ours: theirs for theirs, (ours, _) in TOP_RENAMES.items()}.get(key, key)
    prefix = m.group(1) if m.group(1) == "visual." else ""
    return f"{prefix}transformer.resblocks.{m.group(2)}.{back[new]}{m.group(3)[len(new):]}"


def convert_open_clip_state_dict(state: dict[str, Any], model_cfg: Optional[dict[str, Any]] = None, *,
                                 image_mean: Optional[Sequence[float]] = None,
                                 image_std: Optional[Sequence[float]] = None, copy: bool = True
                                 ) -> tuple[CLIP, dict[str, Any]]:
    """open_clip state dict (+ optional open_clip model config dict) -> (clipdino CLIP in eval mode, export config).

    copy=False lets the model share storage with float32 input tensors (saves memory when the input is discarded).
    """
    state = _unwrap(state)
    problems = [f"{what} ({short(keys, 3)})" for pattern, what in UNSUPPORTED
                if (keys := [k for k in state if re.search(pattern, k)])]
    if model_cfg:
        problems += _unsupported_config(model_cfg)
    if problems:
        raise ValueError(f"unsupported open_clip model: {'; '.join(problems)}")
    vision_cfg, text_cfg, embed_dim = infer_configs(state, model_cfg)
    converted, source, unknown = _rename(state, copy)
    if unknown:
        raise ValueError(f"unsupported open_clip keys: {short(unknown)}")

    model = load_strict(lambda: CLIP(VisionTransformer(vision_cfg), TextTransformer(text_cfg), embed_dim,
                                     max_logit_scale=100.0, init_logit_bias=0.0 if "logit_bias" in converted else None),
                        converted, "open_clip", lambda k: source.get(k) or _open_clip_name(k))
    preprocess = (model_cfg or {}).get("preprocess_cfg") or {}
    config = {"vision": asdict(model.visual.cfg), "text": {"type": "transformer", **asdict(text_cfg)},
              "embed_dim": embed_dim, "max_logit_scale": model.max_logit_scale,
              "has_logit_bias": model.logit_bias is not None, "tokenizer": None,
              "text_tokenizer": (model_cfg or {}).get("text_cfg", {}).get("hf_tokenizer_name") or "openai-clip-bpe",
              "image_mean": [float(x) for x in image_mean or preprocess.get("mean") or OPENAI_MEAN],
              "image_std": [float(x) for x in image_std or preprocess.get("std") or OPENAI_STD]}
    return model.eval(), config


def read_model_config(path: str | Path) -> dict[str, Any]:
    """open_clip `model_configs/*.json` or a hub `open_clip_config.json` ({"model_cfg", "preprocess_cfg"})."""
    cfg = read_json(Path(path), "such model config file")
    if isinstance(cfg.get("model_cfg"), dict):
        cfg = {**cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg") or {}}
    if "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ValueError(f"{path}: not an open_clip model config (needs vision_cfg and text_cfg)")
    return cfg


def load_open_clip_checkpoint(path: str, model_cfg_path: Optional[str] = None, *,
                              image_mean: Optional[Sequence[float]] = None,
                              image_std: Optional[Sequence[float]] = None) -> tuple[CLIP, dict[str, Any]]:
    """Checkpoint file (+ optional open_clip model config JSON) -> (clipdino CLIP, export config)."""
    model_cfg = read_model_config(model_cfg_path) if model_cfg_path else None
    return convert_open_clip_state_dict(read_state_dict(path), model_cfg, image_mean=image_mean, image_std=image_std,
                                        copy=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = converter_parser("Convert an open_clip ViT CLIP checkpoint into a clipdino export.",
                              ".bin / .pt / .pth (torch, weights_only) or .safetensors", "OpenAI CLIP's / the config's")
    parser.add_argument("--model-config", help="open_clip model config JSON (heads, flags); optional for stock ViTs")
    args = parser.parse_args(argv)

    def convert() -> tuple[Path, str]:
        model, config = load_open_clip_checkpoint(args.checkpoint, args.model_config,
                                                  image_mean=args.image_mean, image_std=args.image_std)
        out = save_export(args.out, model, "clip", config,
                          meta={"source": str(args.checkpoint), "converted_from": "open_clip"})
        v, t = config["vision"], config["text"]
        return out, (f"ViT width {v['width']} depth {v['depth']} patch {v['patch_size']} image {v['image_size']}, "
                     f"text width {t['width']} layers {t['layers']} context {t['context_length']}, "
                     f"embed {config['embed_dim']}")

    return run_cli(convert)

if __name__ == "__main__":
    sys.exit(main())

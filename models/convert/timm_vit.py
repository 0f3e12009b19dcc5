"""Convert timm Vision Transformers (and the original DINO checkpoints) into clipdino `vit` exports.

    python -m models.convert.timm_vit dino_vitbase16_pretrain.pth --out exports/dino_b16
    python -m models.convert.timm_vit ~/hf/timm/vit_base_patch16_224.dino --out exports/dino_b16   # hub folder
    python -m models.convert.timm_vit dino_checkpoint_teacher.pth --checkpoint-key teacher --out exports/x

    vit, config = convert_timm_state_dict(timm_model.state_dict())

Layout: timm's `VisionTransformer` with class-token pooling (`cls_token`, `pos_embed` covering the class token
and the patch grid, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`,
`norm_pre` optional, `norm`), which is also facebookresearch/dino's `vision_transformer.py` (the released
`dino_vit*_pretrain.pth` files, timm's `vit_base_patch16_224.dino`). DINO training checkpoints hold
`student` / `teacher` dicts with `module.` / `backbone.` prefixes: pick one with `checkpoint_key` (the teacher,
as DINO evaluates it). Classifier / projection heads (`head.*`) are dropped: the export is the backbone.
Refused with the offending keys named: registers (`reg_token`), average pooling (`fc_norm`), attention
pooling, q/k norm, position tables without a class-token slot.
Heads are invisible in weights: `heads` (default width // 64, true for every stock ViT); LayerNorm eps
1e-6 (timm / DINO default; pass `norm_eps=1e-5` for timm CLIP towers); `act="quick_gelu"` for OpenAI CLIP
towers (inferred from a hub folder's architecture name containing "quickgelu").
"""
from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from models.convert.common import (build_vit, converter_parser, read_json, read_weights, require_tensors, run_cli,
                                   short, strip_prefixes, vit_config_from_weights, vit_summary)
from models.export import save_export
from models.vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFIXES = ("module.", "_orig_mod.", "backbone.")
DROPPED = re.compile(r"^head(\.|_)")  # classifier / CLIP projection / DINO projection head
UNSUPPORTED = [(r"^reg_token$", "register tokens (reg_token)"), (r"^fc_norm\.", "average pooling (fc_norm)"),
               (r"^attn_pool\.", "attention pooling (attn_pool)"),
               (r"\.attn\.(q_norm|k_norm|norm)\.", "q/k normalisation in attention"),
               (r"^(dist_token|head_dist)", "distillation token (DeiT)"),
               (r"\.mlp\.norm\.", "MLP norm (scale_mlp_norm)"),
               (r"^blocks\.\d+\.attn\.(q|k|v)_bias$", "separate q/v biases (BEiT-style attention)")]
RENAMES = {f"patch_embed.proj.{p}": f"patch_embed.{p}" for p in ("weight", "bias")}


def select_state(state: dict[str, Any], checkpoint_key: Optional[str] = None) -> dict[str, Any]:
    """The backbone state dict inside a plain / training / DINO checkpoint."""
    if checkpoint_key:
        if not isinstance(state.get(checkpoint_key), dict):
            found = [k for k, v in state.items() if isinstance(v, dict)]
            raise ValueError(f"checkpoint has no {checkpoint_key!r} dict (dicts in it: {found or 'none'})")
        return state[checkpoint_key]
    for key in ("teacher", "state_dict", "model"):  # DINO training checkpoints: the teacher, as DINO evaluates it
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def convert_timm_state_dict(state: dict[str, Any], *, heads: Optional[int] = None, norm_eps: float = 1e-6,
                            act: str = "gelu", checkpoint_key: Optional[str] = None,
                            image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD
                            ) -> tuple[VisionTransformer, dict[str, Any]]:
    """timm / DINO ViT state dict -> (clipdino VisionTransformer in eval mode, `vit` export config)."""
    state = require_tensors(strip_prefixes(select_state(state, checkpoint_key), PREFIXES), "timm ViT")
    problems = [f"{what} ({short(keys, 3)})" for pattern, what in UNSUPPORTED
                if (keys := [k for k in state if re.search(pattern, k)])]
    if problems:
        raise ValueError(f"unsupported timm ViT: {'; '.join(problems)}")
    dropped = sorted(k for k in state if DROPPED.match(k))
    converted = {RENAMES.get(k, k): v for k, v in state.items() if not DROPPED.match(k)}
    back = {v: k for k, v in RENAMES.items()}
    source = lambda key: back.get(key, key)  # noqa: E731
    cfg = vit_config_from_weights(converted, heads=heads, norm_eps=norm_eps, act=act, source=source)
    vit = build_vit(converted, cfg, "timm ViT", source)
    config = {"vision": asdict(vit.cfg), "image_mean": [float(x) for x in image_mean],
              "image_std": [float(x) for x in image_std], "dropped_keys": short(dropped) if dropped else ""}
    return vit, config


def load_timm_checkpoint(path: str | Path, **kwargs: Any) -> tuple[VisionTransformer, dict[str, Any]]:
    """A weight file, or a timm Hugging Face hub folder (config.json + model.safetensors / pytorch_model.bin)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        hub = read_json(path / "config.json", "timm config")
        pretrained = hub.get("pretrained_cfg") or {}
        for ours, theirs in (("image_mean", "mean"), ("image_std", "std")):
            if kwargs.get(ours) is None and pretrained.get(theirs):
                kwargs[ours] = pretrained[theirs]
        arch = str(hub.get("architecture", ""))
        if "quickgelu" in arch and kwargs.get("act") in (None, "gelu"):
            kwargs["act"] = "quick_gelu"
        if "_clip_" in arch and kwargs.get("norm_eps") is None:
            kwargs["norm_eps"] = 1e-5
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return convert_timm_state_dict(read_weights(path), **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = converter_parser("Convert a timm / DINO ViT checkpoint into a clipdino vit export.",
                              ".pth / .bin (torch, weights_only) / .safetensors, or a timm hub folder",
                              "ImageNet / the hub config's")
    parser.add_argument("--checkpoint-key", help="sub-dict to convert (DINO training checkpoints: teacher)")
    parser.add_argument("--heads", type=int, help="attention heads (default width // 64)")
    parser.add_argument("--norm-eps", type=float, help="LayerNorm eps (default 1e-6; timm CLIP towers 1e-5)")
    parser.add_argument("--act", choices=("gelu", "quick_gelu"), help="MLP activation (default gelu)")
    args = parser.parse_args(argv)

    def convert() -> tuple[Path, str]:
        vit, config = load_timm_checkpoint(args.checkpoint, heads=args.heads, norm_eps=args.norm_eps, act=args.act,
                                           checkpoint_key=args.checkpoint_key, image_mean=args.image_mean,
                                           image_std=args.image_std)
        dropped = config["dropped_keys"]
        meta = {"source": str(args.checkpoint), "converted_from": "timm", "dropped": dropped}
        out = save_export(args.out, vit, "vit", config, meta=meta)
        return out, vit_summary(config["vision"]) + (f"; dropped {dropped}" if dropped else "")

    return run_cli(convert)


if __name__ == "__main__":
    sys.exit(main())

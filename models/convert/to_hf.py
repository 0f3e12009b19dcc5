"""Export a clipdino encoder as the native transformers vision model (the other direction of hf_clip / hf_vit).

    python -m models.convert.to_hf runs/x/export/step_0000100 --out hf/x_step100 [--purpose llava]
    config, state = hf_vision_from_vit(vit, purpose="llava")   # for the VLM builder
    model = transformers.AutoModel.from_config(config); model.load_state_dict(state, strict=True)

The folder it writes (`config.json`, `model.safetensors`, `preprocessor_config.json`) loads with
`AutoModel.from_pretrained(DIR)` / `AutoImageProcessor.from_pretrained(DIR)` and no clipdino code.

| clipdino ViT                               | transformers type                 | model class               |
|--------------------------------------------|-----------------------------------|---------------------------|
| pre_norm (open_clip ln_pre: tiny, ViT-B)   | `clip_vision_model`               | CLIPVisionModel           |
| no pre_norm, no layer_scale, no registers  | `vit`                             | ViTModel                  |
| no pre_norm, layer_scale                   | `dinov2`                          | Dinov2Model               |
| no pre_norm, num_registers > 0             | `dinov2_with_registers`           | Dinov2WithRegistersModel  |

Exact at the native image size (fp32 differences ~1e-6): CLIP's patch conv has no bias, so ours is folded into
the patch rows of the position table (pos[1:] += bias; bicubic resizing keeps a constant, so this stays exact
with `interpolate_pos_encoding=True`); a missing qkv / patch bias becomes zeros, a missing layer scale (registers
without it) ones; HF "gelu" is the exact erf GELU like ours. Token order is ours: [cls, registers, patches], with
positions added before the registers are inserted. Where the tokens are read:
    CLIP:   our final-norm tokens = post_layernorm(last_hidden_state) (CLIP's last_hidden_state is before it);
            our CLS feature = pooler_output.
    others: our final-norm tokens = last_hidden_state; our CLS feature = pooler_output (ViT: an identity pooler
            with a linear activation, written so the model loads with no missing key) = last_hidden_state[:, 0].
    all:    hidden_states[i] = output of block i-1 (hidden_states[0] = the embeddings, after ln_pre for CLIP), so
            hidden_states[-2] = forward_intermediates(x, [-2])[0]: LLaVA's layer -2.
Other image sizes: ours always resizes the position table (bicubic); HF ViT / CLIP do so only with
`interpolate_pos_encoding=True` (same bicubic), Dinov2 always (same), Dinov2-with-registers always but with
antialias=True (a different kernel: not exact off the native size).
Dropped: drop_path (stochastic depth is training-only; HF Dinov2's drop_path_rate is uniform, ours decays
linearly, so it is set to 0), attn_backend and init. Refused with the option named (ValueError): registers or
layer_scale with pre_norm (CLIP has neither), a non-integer MLP ratio for Dinov2 (its config takes an int), and
registers with purpose="llava" (LLaVA's "default" feature strategy drops only token 0, so registers would reach
the LLM as image tokens).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from models.atomic import atomic_folder
from models.convert.common import (build_vit, converter_parser, read_json, read_state_dict, run_cli, short,
                                   to_source_names, vit_summary)
from models.convert.hf_clip import OPENAI_MEAN, OPENAI_STD, VISION_INVERSE as CLIP_NAMES
from models.convert.hf_vit import INVERSE as VIT_INVERSE, _INV_EMBED as VIT_EMBED_NAMES
from models.export import FORMAT
from models.vit import ViTConfig, VisionTransformer

PURPOSES = ("encoder", "llava")
VIT_NAMES = VIT_INVERSE["5.x"]
_D = r"^blocks\.(\d+)\."
DINOV2_NAMES = [*VIT_EMBED_NAMES, (r"^reg_tokens$", "embeddings.register_tokens"),
                (_D + r"attn\.qkv\.(\w+)$", r"encoder.layer.\1.attention.{q,k,v}_proj.\2"),
                (_D + r"attn\.proj\.(\w+)$", r"encoder.layer.\1.attention.o_proj.\2"),
                (_D + r"(norm\d|mlp\.fc\d)\.(\w+)$", r"encoder.layer.\1.\2.\3"),
                (_D + r"ls(\d)\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
                (r"^norm\.(\w+)$", r"layernorm.\1")]
# what this CLI writes (save_pretrained may shard): an existing --out holding anything else is refused, not replaced
HF_OUTPUT_FILES = re.compile(r"^((preprocessor_)?config\.json|model(-\d+-of-\d+)?\.safetensors"
                             r"|model\.safetensors\.index\.json)$")
PROCESSORS = {"clip_vision_model": "CLIPImageProcessor", "vit": "ViTImageProcessor", "dinov2": "BitImageProcessor",
              "dinov2_with_registers": "BitImageProcessor"}


def hf_model_type(cfg: ViTConfig) -> str:
    """The transformers model_type that expresses this ViT exactly; ValueError naming the option it cannot."""
    if cfg.pre_norm:
        for option, value in (("num_registers", cfg.num_registers), ("layer_scale", cfg.layer_scale)):
            if value:
                raise ValueError(f"{option}={value} with pre_norm=True has no transformers equivalent (CLIPVisionModel "
                                 f"has ln_pre but no {option.replace('num_', '')}; Dinov2 has no ln_pre)")
        return "clip_vision_model"
    if cfg.num_registers:
        return "dinov2_with_registers"
    return "dinov2" if cfg.layer_scale else "vit"


def hf_vision_from_vit(vit: VisionTransformer, *, purpose: str = "encoder"
                       ) -> tuple["transformers.PretrainedConfig", dict[str, torch.Tensor]]:
    """Our VisionTransformer -> (native transformers vision config, state dict that loads strictly into
    `transformers.AutoModel.from_config(config)`), tensors on the CPU in the ViT's dtype (the patch-bias fold is
    done in fp32). The mapping, what is exact and what is refused: module docstring.
    purpose="llava" also refuses registers (LlavaForConditionalGeneration would pass them to the LLM)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; choose from {', '.join(PURPOSES)}")
    cfg = vit.cfg
    if purpose == "llava" and cfg.num_registers:
        raise ValueError(f"num_registers={cfg.num_registers}: LLaVA's 'default' vision_feature_select_strategy drops "
                         "only token 0 (the class token), so register tokens would reach the LLM as image tokens")
    model_type = hf_model_type(cfg)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in vit.state_dict().items()}  # (fp32 for the fold)
    common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, hidden_act=cfg.act,
                  layer_norm_eps=cfg.norm_eps)
    layout = {"clip_vision_model": _clip_layout, "vit": _vit_layout}.get(model_type, _dinov2_layout)
    config, names, added = layout(cfg, state, common)  # added: tensors only the HF layout has, under HF names
    out = {**to_source_names(state, names, model_type), **added}
    return config, {k: v.to(vit.pos_embed.dtype).contiguous().clone() for k, v in out.items()}


def _clip_layout(cfg: ViTConfig, state: dict[str, torch.Tensor], common: dict[str, Any]) -> tuple:
    """CLIPVisionModel: the patch conv has no bias (ours is folded into the patch rows of the position table),
    q/k/v always have biases (zeros when ours has none)."""
    import transformers

    W = cfg.width
    if not cfg.qkv_bias:
        state.update({f"blocks.{i}.attn.qkv.bias": torch.zeros(3 * W) for i in range(cfg.depth)})
    pos = state.pop("pos_embed")[0].clone()  # (1+N, W)
    bias = state.pop("patch_embed.bias", None)
    if bias is not None:
        pos[1:] += bias  # conv(x) + b + pos == conv_without_bias(x) + (pos + b) on every patch row
    state.update(pos_embed=pos, cls_token=state["cls_token"].reshape(W))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return transformers.CLIPVisionConfig(intermediate_size=hidden, **common), CLIP_NAMES, {}


def _vit_layout(cfg: ViTConfig, state: dict[str, torch.Tensor], common: dict[str, Any]) -> tuple:
    """ViTModel (AutoModel builds its pooler): an identity pooler with a linear activation, so pooler_output is
    last_hidden_state[:, 0], our CLS feature."""
    import transformers

    W = cfg.width
    state.setdefault("patch_embed.bias", torch.zeros(W))  # HF's patch conv always has a bias
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    config = transformers.ViTConfig(intermediate_size=hidden, qkv_bias=cfg.qkv_bias, pooler_act="linear", **common)
    return config, VIT_NAMES, {"pooler.dense.weight": torch.eye(W), "pooler.dense.bias": torch.zeros(W)}


def _dinov2_layout(cfg: ViTConfig, state: dict[str, torch.Tensor], common: dict[str, Any]) -> tuple:
    """Dinov2Model / Dinov2WithRegistersModel: layer scale always present (ones when ours has none), an integer
    MLP ratio, the registers' model always carries an (unused) mask token."""
    import transformers

    W = cfg.width
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    if hidden % W:
        raise ValueError(f"mlp_ratio={cfg.mlp_ratio} (MLP width {hidden} for width {W}): Dinov2's config takes an "
                         "integer mlp_ratio")
    state.setdefault("patch_embed.bias", torch.zeros(W))  # HF's patch conv always has a bias
    for i in range(cfg.depth):
        for j in (1, 2):
            state.setdefault(f"blocks.{i}.ls{j}.gamma", torch.ones(W))
    options = dict(mlp_ratio=hidden // W, qkv_bias=cfg.qkv_bias, layerscale_value=cfg.layer_scale or 1.0,
                   drop_path_rate=0.0, use_swiglu_ffn=False, **common)
    if not cfg.num_registers:
        return transformers.Dinov2Config(use_mask_token=False, **options), DINOV2_NAMES, {}
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=cfg.num_registers, **options)
    return config, DINOV2_NAMES, {"embeddings.mask_token": torch.zeros(1, W)}  # used only with bool_masked_pos


def image_processor_for(vit: VisionTransformer, image_mean: Sequence[float], image_std: Sequence[float]):
    """The transformers image processor of `hf_vision_from_vit(vit)`'s model type: resize the short side to
    vit.cfg.image_size (bicubic, antialiased), centre crop image_size, scale to [0, 1], normalise with
    image_mean / image_std (CLIPImageProcessor for CLIP, ViTImageProcessor for ViT, BitImageProcessor for Dinov2).

    That is our eval transform (`data.transforms.EvalTransform`) to ~2e-7 with transformers' default torchvision
    backend (tested); its PIL backend (`*ImageProcessorPil`) resamples differently. One difference in default:
    our evaluation normalises with ImageNet's mean / std (the probing protocol) unless `--normalize export`;
    this processor uses the statistics given here (the CLI: the ones the encoder was trained with)."""
    import transformers

    size = vit.cfg.image_size
    processor_class = getattr(transformers, PROCESSORS[hf_model_type(vit.cfg)])
    return processor_class(do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL.Image.BICUBIC
                           do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=[float(x) for x in image_mean],
                           image_std=[float(x) for x in image_std], do_convert_rgb=True)


# ---------------------------------------------------------------------------------------------------- CLI
def load_vision_tower(folder: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """The image tower of an export (kind vit; kind clip: its `visual.*`), strictly, without building the text
    tower (a frozen Hugging Face text tower would need its own files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such export folder")
    config = read_json(folder / "config.json", "export config.json")
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / 'config.json'}: not a clipdino export (format={config.get('format')!r})")
    prefix = {"vit": "", "clip": "visual."}.get(config.get("kind"))
    if prefix is None:
        raise ValueError(f"{folder / 'config.json'}: unknown export kind {config.get('kind')!r} (vit or clip)")
    try:
        vit_cfg = ViTConfig(**config["vision"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: bad 'vision' section ({e})") from e
    state = read_state_dict(folder / "model.safetensors")
    vision = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return build_vit(vision, vit_cfg, f"{config['kind']} export"), config


def training_image_stats(config: dict[str, Any]) -> tuple[list[float], list[float], str]:
    """(mean, std, where from) the encoder was trained with: the export's image_mean / image_std (the trainer and
    every converter record them), else data.mean / data.std of the run's config.yaml (meta.run_dir), else OpenAI
    CLIP's (the training config's default)."""
    if config.get("image_mean") and config.get("image_std"):
        return list(config["image_mean"]), list(config["image_std"]), "the export"
    run_dir = (config.get("meta") or {}).get("run_dir")
    run_config = Path(str(run_dir)) / "config.yaml"
    if run_dir and run_config.is_file():
        import yaml

        try:
            data = (yaml.safe_load(run_config.read_text()) or {}).get("data") or {}
        except (yaml.YAMLError, AttributeError) as e:
            raise ValueError(f"{run_config}: not a run config ({type(e).__name__}); pass --image-mean / --image-std") from e
        if data.get("mean") and data.get("std"):
            return list(data["mean"]), list(data["std"]), str(run_config)
    return list(OPENAI_MEAN), list(OPENAI_STD), "OpenAI CLIP default"


def check_replaceable(out: Path) -> None:
    """An existing --out is replaced only when it holds nothing but an earlier output of this command."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out takes a folder")
    stray = sorted(p.name for p in out.iterdir() if not HF_OUTPUT_FILES.match(p.name)) if out.is_dir() else []
    if stray:
        raise FileExistsError(f"{out} holds {short(stray, 3)}, not only an earlier output of this command: "
                              "choose a new --out folder")


def export_to_hf(export_dir: str | Path, out: str | Path, *, purpose: str = "encoder",
                 image_mean: Optional[Sequence[float]] = None, image_std: Optional[Sequence[float]] = None
                 ) -> tuple[Path, str]:
    """Write `out/{config.json, model.safetensors, preprocessor_config.json}`; returns (out, summary)."""
    import transformers

    out = Path(out)
    check_replaceable(out)
    vit, export_config = load_vision_tower(export_dir)
    mean, std, stats_from = (None, None, "") if image_mean and image_std else training_image_stats(export_config)
    if image_mean or image_std:
        mean, std = list(image_mean or mean), list(image_std or std)
        stats_from = "--image-mean / --image-std" + (f", else {stats_from}" if stats_from else "")
    config, state = hf_vision_from_vit(vit, purpose=purpose)
    model = transformers.AutoModel.from_config(config)
    model.load_state_dict(state, strict=True)
    with atomic_folder(out) as tmp:  # the folder appears complete or not at all
        model.save_pretrained(tmp)
        image_processor_for(vit, mean, std).save_pretrained(tmp)
    summary = (f"{config.model_type} ({type(model).__name__}) from a {export_config['kind']} export: "
               f"{vit_summary(export_config['vision'])}; mean/std from {stats_from}")
    return out, summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = converter_parser("Export a clipdino encoder (vit export, or a clip export's image tower) as the native "
                              "transformers vision model + image processor.", "clipdino export folder",
                              "the export's image_mean / image_std (else its run's data.mean / std, else OpenAI CLIP)")
    parser.add_argument("--purpose", choices=PURPOSES, default="encoder",
                        help="llava: also refuse what LlavaForConditionalGeneration cannot use (registers)")
    args = parser.parse_args(argv)
    return run_cli(lambda: export_to_hf(args.checkpoint, args.out, purpose=args.purpose, image_mean=args.image_mean,
                                        image_std=args.image_std))


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the converters: reading untrusted weight files, inferring a ViT from its weights,
loading converted tensors strictly (errors name the missing / unexpected source keys), one-line CLIs.

Every converter maps foreign keys to clipdino keys first (keeping a clipdino key -> source key map for
messages), then builds the module on the meta device and assigns the tensors, so nothing is initialised
twice and nothing foreign is ever unpickled (`torch.load(weights_only=True)` or safetensors only).
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from models.vit import VIT_SIZES, ViTConfig, VisionTransformer, default_heads

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
HF_CHECKPOINT_HELP = "HF model folder (config.json + weights) or a weight file with --config"
HF_CONFIG_HELP = "config.json (default: the one in the checkpoint's folder)"



def short(keys: Sequence[str], limit: int = 6) -> str:
    """"a, b, c (+N more)": key lists in error messages."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Weights from `.safetensors` or a torch file loaded with weights_only=True (never arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ValueError(f"{path}: not a torch checkpoint ({str(e).splitlines()[0]})") from e
        raise ValueError(f"{path}: refusing to load: the file holds Python objects that torch.load(weights_only="
                         f"True) does not allow; re-save it as a plain state dict or .safetensors") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A weight file (.safetensors / torch, weights_only) or a Hugging Face model folder (single or sharded)."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        for name in INDEX_FILES:
            if (path / name).is_file():
                index = read_json(path / name, "weight index")
                state: dict[str, torch.Tensor] = {}
                for shard in sorted(set(index.get("weight_map", {}).values())):
                    state.update(read_state_dict(path / shard))
                return state
        raise FileNotFoundError(f"{path}: no {' / '.join(WEIGHT_FILES + INDEX_FILES)} in this folder")
    return read_state_dict(path)  # nested dicts (training checkpoints) are unwrapped by the converter


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def hf_preprocess(folder: Path) -> dict[str, Any]:
    """image_mean / image_std / crop size from a Hugging Face `preprocessor_config.json` when present."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path, "preprocessor config")
    out = {k: [float(x) for x in cfg[k]] for k in ("image_mean", "image_std") if isinstance(cfg.get(k), list)}
    crop = cfg.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if isinstance(crop, int):
        out["crop_size"] = crop
    return out


def strip_prefixes(state: dict[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """Remove wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, ...) wherever they lead a key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def require_tensors(state: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a {what} state dict: {short(bad, 3)} hold {type(state[bad[0]]).__name__}, not tensors")
    return state


def vit_config_from_weights(state: dict[str, torch.Tensor], *, heads: Optional[int] = None, norm_eps: float = 1e-6,
                            act: str = "gelu", source: Callable[[str], str] = str) -> ViTConfig:
    """ViTConfig from clipdino-named tensors (widths, depth, patch / image size, MLP ratio, optional parts).

    Head counts are invisible in weights: `heads`, else `default_heads` (the stock ViTs' counts)."""
    def need(key: str, ndim: int) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"missing key {source(key)!r}: not a supported ViT layout")
        if state[key].ndim != ndim:
            raise ValueError(f"{source(key)}: expected {ndim} dims, got shape {tuple(state[key].shape)}")
        return state[key]

    conv = need("patch_embed.weight", 4)
    width, patch = conv.shape[0], conv.shape[-1]
    if conv.shape[-2] != patch:
        raise ValueError(f"non-square patches {tuple(conv.shape[-2:])} are not supported")
    tokens = need("pos_embed", 3).shape[1] - 1
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens:
        raise ValueError(f"{source('pos_embed')} has {tokens + 1} positions: not class token + a square patch grid "
                         "(layouts without a class-token position are not supported)")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _VIT_BLOCK.match(k))), default=-1)
    if depth == 0:
        raise ValueError("no transformer blocks found: not a supported ViT layout")
    hidden = need("blocks.0.mlp.fc1.weight", 2).shape[0]
    mlp_ratio = mlp_ratio_for(hidden, width)
    heads = heads or default_heads(width, depth)
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads")
    size = next((name for name, dims in VIT_SIZES.items() if dims == (width, depth, heads)), "base")
    registers = state["reg_tokens"].shape[1] if "reg_tokens" in state else 0
    return ViTConfig(size=size, patch_size=patch, image_size=grid * patch, width=width, depth=depth, heads=heads,
                     mlp_ratio=mlp_ratio,
                     qkv_bias="blocks.0.attn.qkv.bias" in state,
                     layer_scale=1.0 if "blocks.0.ls1.gamma" in state else None, num_registers=registers,
                     pre_norm="norm_pre.weight" in state, norm_eps=norm_eps, patch_bias="patch_embed.bias" in state,
                     act=act)


def mlp_ratio_for(hidden: int, width: int) -> float:
    """The mlp_ratio whose `int(width * ratio)` (what Block builds) gives back `hidden` despite float round-off."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def load_strict(factory: Callable[[], nn.Module], converted: dict[str, torch.Tensor], what: str,
                source: Callable[[str], str] = str) -> nn.Module:
    """Build `factory()` on the meta device and assign `converted` (float32); every key must match both ways."""
    with torch.device("meta"):
        module = factory()
    expected = module.state_dict()
    missing = [source(k) for k in expected if k not in converted]
    if missing:
        raise ValueError(f"{what} checkpoint is missing keys: {short(missing)}")
    extra = [source(k) for k in converted if k not in expected]
    if extra:
        raise ValueError(f"unexpected {what} keys for the inferred architecture: {short(extra)}")
    wrong = [f"{source(k)} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in converted.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"shape mismatch ({what} vs clipdino): {short(wrong, 3)}")
    module.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in converted.items()}, strict=True,
                           assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError("conversion left meta tensors: the module has state outside its state dict")
    return module.eval()


def build_vit(converted: dict[str, torch.Tensor], cfg: ViTConfig, what: str,
              source: Callable[[str], str] = str) -> VisionTransformer:
    return load_strict(lambda: VisionTransformer(cfg), converted, what, source)  # type: ignore[return-value]


def converter_parser(description: str, checkpoint_help: str, stats_default: str) -> argparse.ArgumentParser:
    """The arguments every converter CLI takes: the checkpoint, --out, --image-mean / --image-std."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint", help=checkpoint_help)
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("--image-mean", type=float, nargs=3, help=f"default: {stats_default}")
    parser.add_argument("--image-std", type=float, nargs=3, help=f"default: {stats_default}")
    return parser


def run_cli(convert: Callable[[], tuple[Path, str]]) -> int:
    """Run a converter's main body; errors become one line on stderr (exit 2)."""
    try:
        out, summary = convert()
    except (ValueError, OSError, RuntimeError) as e:  # FileNotFoundError is an OSError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {summary}")
    return 0


def vit_summary(cfg: dict[str, Any]) -> str:
    return (f"ViT width {cfg['width']} depth {cfg['depth']} heads {cfg['heads']} patch {cfg['patch_size']} "
            f"image {cfg['image_size']} act {cfg['act']}")


_QKV = re.compile(r"^(.*\.attn)\.(q|k|v)\.(weight|bias)$")


def fuse_qkv(converted: dict[str, torch.Tensor], sources: dict[str, str]) -> dict[str, torch.Tensor]:
    """Concatenate separate `X.attn.{q,k,v}.{weight,bias}` into clipdino's fused `X.attn.qkv.*` ([q; k; v])."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in converted.items():
        m = _QKV.match(key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in groups.items():
        absent = [p for p in "qkv" if p not in parts]
        if absent:
            present = sources[f"{prefix}.{next(iter(parts))}.{kind}"]
            raise ValueError(f"checkpoint has {present} but not its {'/'.join(absent)} counterpart(s)")
        fused = f"{prefix}.qkv.{kind}"
        out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        sources[fused] = sources[f"{prefix}.q.{kind}"].replace("q_proj", "{q,k,v}_proj").replace(
            "query", "{query,key,value}")
    return out


def rename_keys(state: dict[str, torch.Tensor], rules: Sequence[tuple[str, str]], dropped: re.Pattern | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[str]]:
    """Apply the first matching (regex, replacement) rule per key.

    Returns (converted, clipdino key -> source key, unknown source keys, dropped source keys)."""
    converted, sources, unknown, gone = {}, {}, [], []
    compiled = [(re.compile(p), r) for p, r in rules]
    for key, value in state.items():
        if dropped is not None and dropped.search(key):
            gone.append(key)
            continue
        for pattern, repl in compiled:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                converted[new], sources[new] = value, key
                break
        else:
            unknown.append(key)
    return converted, sources, unknown, gone


def complete_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill the defaults a saved Hugging Face config.json leaves out (it stores only non-default values)."""
    model_type = config.get("model_type")
    if not model_type:
        return config
    try:
        from transformers import AutoConfig
    except ImportError:  # transformers is a dependency; without it, trust the file
        return config
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}
    try:
        return AutoConfig.for_model(model_type, **fields).to_dict()
    except Exception as e:  # unknown model type or an invalid config: say which, in one line
        raise ValueError(f"config.json (model_type={model_type!r}) is not a valid config: "
                         f"{str(e).strip().splitlines()[-1]}") from e


def namer(sources: dict[str, str], inverse: Sequence[tuple[str, str]], prefix: str = "") -> Callable[[str], str]:
    """clipdino key -> source key for messages: the recorded source, else the name the layout would use
    (`inverse`: (clipdino-key regex, source template) pairs, first match wins)."""
    compiled = [(re.compile(p), r) for p, r in inverse]

    def name(key: str) -> str:
        if key in sources:
            return sources[key]
        for pattern, repl in compiled:
            if pattern.match(key):
                return prefix + pattern.sub(repl, key)
        return key

    return name


_ALTERNATION = re.compile(r"\{([\w,]+)\}")


def to_source_names(state: dict[str, torch.Tensor], inverse: Sequence[tuple[str, str]], what: str
                    ) -> dict[str, torch.Tensor]:
    """clipdino-named tensors -> a foreign layout's names, through the same (clipdino-key regex, source template)
    table `namer` uses for messages (first match wins): the export direction of `rename_keys`. A name with an
    alternation (`{q,k,v}_proj`, as `fuse_qkv` records it) splits the fused tensor into that many equal parts along
    dim 0, in order: the inverse of `fuse_qkv`. A key no rule names is an error."""
    compiled = [(re.compile(p), r) for p, r in inverse]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        rule = next(((p, r) for p, r in compiled if p.match(key)), None)
        if rule is None:
            unknown.append(key)
            continue
        name = rule[0].sub(rule[1], key)
        alt = _ALTERNATION.search(name)
        if alt is None:
            out[name] = value
            continue
        parts = alt.group(1).split(",")
        if value.shape[0] % len(parts):
            raise ValueError(f"{key} {tuple(value.shape)} does not split into {len(parts)} equal parts ({name})")
        for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
            out[name[:alt.start()] + part + name[alt.end():]] = chunk
    if unknown:
        raise ValueError(f"no {what} name for clipdino keys: {short(unknown)}")
    return out

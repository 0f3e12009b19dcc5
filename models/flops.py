"""Analytic forward FLOPs (2 FLOPs per multiply-add), the numerator of MFU.

Counted: every matmul of the transformer blocks (qkv, attention scores, attention x values,
output projection, MLP), the patch embedding and the heads/projections. Not counted: norms,
softmax, activations (a few percent). Training FLOPs = 3 x forward for what is trained (the
backward pass costs twice the forward), 1 x forward for frozen or no-grad parts (EMA teacher,
frozen text tower). ViT-B/16 at 224 px gives 35.1 GFLOPs, open_clip's profile number.
"""
from __future__ import annotations

import torch.nn as nn


def transformer_forward_flops(width: int, depth: int, tokens: int, mlp_hidden: int) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp_hidden)  # qkv + proj + MLP
    per_layer += 2 * 2 * tokens * tokens * width  # scores + weighted sum
    return float(depth * per_layer)


def vit_forward_flops(vit: nn.Module, image_size: int) -> float:
    cfg = vit.cfg
    grid = image_size // cfg.patch_size
    tokens = vit.num_prefix_tokens + grid * grid
    patch = 2 * grid * grid * (3 * cfg.patch_size ** 2) * cfg.width
    return patch + transformer_forward_flops(cfg.width, cfg.depth, tokens, int(cfg.width * cfg.mlp_ratio))


def text_forward_flops(text: nn.Module) -> float:
    """Our TextTransformer at full context length, or a Hugging Face encoder (by its config)."""
    if hasattr(text, "encoder"):  # FrozenHFTextTower
        c = text.encoder.config  # BERT-style names, else DistilBERT's (dim, n_layers, hidden_dim)
        width = getattr(c, "hidden_size", None) or getattr(c, "dim")
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers")
        hidden = getattr(c, "intermediate_size", None) or getattr(c, "hidden_dim", None) or 4 * width
        return transformer_forward_flops(width, layers, text.max_length, hidden)
    c = text.cfg
    return transformer_forward_flops(c.width, c.layers, c.context_length, int(c.width * c.mlp_ratio))


def linear_flops(module: nn.Module, rows: int = 1) -> float:
    """All nn.Linear layers (and DINO's prototype matrix) of a module, applied to `rows` inputs."""
    total = sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    v = getattr(module, "last_layer_v", None)
    if v is not None:
        total += 2 * v.shape[0] * v.shape[1]
    return float(total * rows)

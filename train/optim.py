"""AdamW parameter groups and the per-step schedules (LR warm-up + cosine, weight-decay cosine)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str], group_of=lambda name: ""
                 ) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups (norms, biases, embeddings, tokens get no decay),
    further split by `group_of(name)` (e.g. DINO's last layer). Each group carries a "name" and its base decay."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and name not in no_decay_names and not name.endswith(".bias")
        key = (group_of(name) or "default") + ("/decay" if decay else "/no_decay")
        group = groups.setdefault(key, {"name": key, "params": [], "weight_decay": weight_decay if decay else 0.0,
                                        "apply_decay": decay})
        group["params"].append(p)
    return list(groups.values())


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, floor)


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at step `total` (held after)."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def weight_decay_at(step: int, total: int, start: float, end: float | None) -> float:
    return start if end is None else cosine(step, total, start, end)


def build_adamw(groups: list[dict], lr: float, betas, eps: float) -> torch.optim.Optimizer:
    """torch's AdamW; `foreach` on CPU, `fused` on CUDA (one kernel for all parameters)."""
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)

"""AdamW parameter groups, the per-step schedules (LR warm-up + cosine, weight-decay cosine), DINO's
per-parameter gradient clipping, and lengths given in epochs or in samples seen."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str], group_of=lambda name: ""
                 ) -> list[dict]:
    """Trainable parameters split into decay / no-decay groups: biases and parameters under 2-D always get no decay
    (DINO's get_params_groups rule), and so do `no_decay_names` (the timm / open_clip rule adds embeddings and
    tokens there); further split by `group_of(name)` (e.g. DINO's last layer). Each group carries a "name" and its
    base decay."""
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


def steps_for(samples: Optional[int], epochs: float, steps_per_epoch: int, global_batch: int) -> int:
    """A length in optimizer steps: `samples` seen when given (whole steps, as DINO's iterations per epoch drop the
    last partial batch), else `epochs` passes over the training data."""
    if samples is not None:
        return samples // global_batch
    return int(epochs * steps_per_epoch)


@torch.no_grad()
def clip_gradients_per_param(parameters: Iterable[torch.Tensor], clip: float) -> None:
    """facebookresearch/dino `utils.clip_gradients`: each parameter's gradient is scaled on its own by
    clip / (||grad|| + 1e-6) when that is below 1 (not one global norm). No host sync: the comparison is a clamp."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # (n_params,)
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)  # 1.0 leaves a gradient exactly as it was
    torch._foreach_mul_(grads, list(coefs.unbind(0)))


def skip_held_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer.step()` leave out every group marked `held` (the trainer marks a group whose LR scale is 0):
    no update, no weight decay, its Adam moments and step count untouched - what DINO's
    `cancel_gradients_last_layer` (p.grad = None) gives. Exact under ZeRO 0/1/2 alike: ZeRO-1/2 keep one flat
    partition per group and step the wrapped optimizer once per group (`_optimizer_step`), so a held group is
    skipped whole. Step hooks, not a subclass: DeepSpeed keeps treating the optimizer as torch's AdamW."""
    outer: list[list[dict]] = []

    def before(opt, args, kwargs):
        outer.append(opt.param_groups)
        opt.param_groups = [g for g in opt.param_groups if not g.get("held")]

    def after(opt, args, kwargs):
        opt.param_groups = outer.pop()

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def build_adamw(groups: list[dict], lr: float, betas, eps: float) -> torch.optim.Optimizer:
    """torch's AdamW skipping `held` groups (above); `foreach` on CPU, `fused` on CUDA (one kernel for all parameters)."""
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return skip_held_groups(torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs))

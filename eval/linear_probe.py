"""Linear probing as in the authors' code (github.com/leo1oel/ViT-linear-probing), with honest selection.

Protocol: features z-scored per dimension with train statistics; one `nn.Linear` (PyTorch's default Kaiming-
uniform init) trained with AdamW + cross-entropy, linear warm-up then cosine decay to 0 (per step); an LR x
weight-decay grid, each point trained for a few quick epochs; the chosen point is trained for the full epochs
and the best epoch is kept.

Selection (`select_on`):
- "heldout" (default): a seeded `heldout` fraction of train is set aside; statistics, grid and epoch are chosen
  on it and the val split is evaluated once, with the selected weights;
- "val": the authors' choice: train on all of train, choose grid point and epoch on val, report that
  (optimistically biased; offered to match their numbers).
All grid points train together (one batched matmul, one AdamW with a parameter group per point).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeConfig:
    lrs: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3)
    weight_decays: Sequence[float] = (0.0, 1e-6, 1e-3)
    epochs: int = 50
    warmup_epochs: int = 10
    grid_epochs: int = 5  # quick epochs per grid point (warm-up scaled by grid_epochs / epochs)
    batch_size: int = 2048
    select_on: str = "heldout"  # heldout | val
    heldout: float = 0.1
    seed: int = 0


PRESETS: dict[str, ProbeConfig] = {
    "paper": ProbeConfig(),  # the authors' numbers (ImageNet scale: ~626 steps per epoch)
    # small data (the synthetic world, tests): the paper's batch would give 1-2 steps per epoch
    "small": ProbeConfig(lrs=(1e-4, 1e-3, 1e-2), weight_decays=(0.0, 1e-3, 1e-1), epochs=100, warmup_epochs=10,
                         grid_epochs=20, batch_size=256),
}
AUTO_PAPER_MIN_SAMPLES = 100_000


def preset(name: str, train_samples: int, **overrides: Any) -> ProbeConfig:
    """A named preset ("auto": paper from 100k train samples, else small) with overrides applied."""
    if name == "auto":
        name = "paper" if train_samples >= AUTO_PAPER_MIN_SAMPLES else "small"
    if name not in PRESETS:
        raise ValueError(f"unknown probe preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


class ProbeBank(nn.Module):
    """G independent linear classifiers over the same features: (B, D) -> (G, B, C)."""

    def __init__(self, dim: int, classes: int, count: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, classes) for _ in range(count))  # default (Kaiming) init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([h.weight for h in self.heads])  # (G, C, D)
        bias = torch.stack([h.bias for h in self.heads])  # (G, C)
        return torch.einsum("bd,gcd->gbc", x, weight) + bias[:, None]  # (G, B, C)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy (%) of (N, C) logits."""
    k = min(k, logits.shape[-1])
    hits = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return 100.0 * hits.float().mean().item()


def _train(bank: ProbeBank, points: list[tuple[float, float]], x: torch.Tensor, y: torch.Tensor, epochs: int,
           warmup_epochs: float, batch_size: int, generator: torch.Generator, eval_x: torch.Tensor,
           eval_y: torch.Tensor, track_best: bool) -> tuple[list[float], Optional[dict], int]:
    """Train every head of `bank` on (x, y); returns (final eval accuracy per head, best state, best epoch).

    With `track_best` (a single head), the weights of the epoch with the best eval accuracy are kept."""
    groups = [{"params": list(h.parameters()), "lr": lr, "weight_decay": wd, "base_lr": lr}
              for h, (lr, wd) in zip(bank.heads, points)]
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    step, best, best_state, best_epoch = 0, -1.0, None, 0
    accs: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, warmup)
            logits = bank(x[idx])  # (G, b, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(points)), reduction="mean")
            opt.zero_grad(set_to_none=True)
            (loss * len(points)).backward()  # each head gets its own mean-loss gradient
            opt.step()
            step += 1
        if track_best or epoch == epochs - 1:
            accs = evaluate(bank, eval_x, eval_y)
            if track_best and accs[0] > best:
                best, best_state, best_epoch = accs[0], copy.deepcopy(bank.state_dict()), epoch + 1
    return accs, best_state, best_epoch


@torch.no_grad()
def evaluate(bank: ProbeBank, x: torch.Tensor, y: torch.Tensor, k: int = 1, chunk: int = 8192) -> list[float]:
    hits = torch.zeros(len(bank.heads), device=x.device)
    for start in range(0, len(x), chunk):
        logits = bank(x[start:start + chunk])  # (G, b, C)
        kk = min(k, logits.shape[-1])
        hits += (logits.topk(kk, dim=-1).indices == y[start:start + chunk, None]).any(-1).float().sum(-1)
    return (100.0 * hits / max(len(x), 1)).tolist()


def zscore_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)  # (1, D) each


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, cfg: ProbeConfig = ProbeConfig(), device: str = "cpu") -> dict[str, Any]:
    """Fit the probe on train features (N, D) / labels (N,) and report val top-1 / top-5 (%)."""
    if cfg.select_on not in ("heldout", "val"):
        raise ValueError(f"select_on must be heldout or val, got {cfg.select_on!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    val_x, val_y = val_x.float().to(device), val_y.long().to(device)
    if cfg.select_on == "heldout":
        perm = torch.randperm(len(train_x), generator=gen).to(device)
        n_held = max(1, round(cfg.heldout * len(train_x)))
        sel_idx, fit_idx = perm[:n_held], perm[n_held:]
        fit_x, fit_y, sel_x, sel_y = train_x[fit_idx], train_y[fit_idx], train_x[sel_idx], train_y[sel_idx]
    else:
        fit_x, fit_y, sel_x, sel_y = train_x, train_y, val_x, val_y
    mean, std = zscore_stats(fit_x)
    norm = lambda t: (t - mean) / std  # noqa: E731
    fit_x, sel_x, val_n = norm(fit_x), norm(sel_x), norm(val_x)
    dim = fit_x.shape[1]
    batch = min(cfg.batch_size, len(fit_x))

    # grid: every (lr, wd) for grid_epochs, chosen on the selection split
    points = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    torch.manual_seed(cfg.seed)
    bank = ProbeBank(dim, num_classes, len(points)).to(device)
    warmup = cfg.warmup_epochs if cfg.warmup_epochs < cfg.epochs else 0.2 * cfg.epochs  # short runs: 20% warm-up
    warm = warmup * cfg.grid_epochs / max(cfg.epochs, 1)
    grid_acc, _, _ = _train(bank, points, fit_x, fit_y, cfg.grid_epochs, warm, batch, gen, sel_x, sel_y, False)
    best_point = points[max(range(len(points)), key=lambda i: grid_acc[i])]

    # the chosen point for the full schedule, keeping the best epoch on the selection split
    torch.manual_seed(cfg.seed)
    final = ProbeBank(dim, num_classes, 1).to(device)
    _, best_state, best_epoch = _train(final, [best_point], fit_x, fit_y, cfg.epochs, warmup, batch, gen, sel_x,
                                       sel_y, True)
    final.load_state_dict(best_state)
    top1, top5 = evaluate(final, val_n, val_y, 1)[0], evaluate(final, val_n, val_y, 5)[0]
    return {"top1": top1, "top5": top5 if num_classes > 5 else None,
            "selection_top1": evaluate(final, sel_x, sel_y, 1)[0], "best_epoch": best_epoch,
            "lr": best_point[0], "weight_decay": best_point[1],
            "grid": [{"lr": lr, "weight_decay": wd, "selection_top1": acc} for (lr, wd), acc in zip(points, grid_acc)],
            "train_samples": len(fit_x), "selection_samples": len(sel_x), "val_samples": len(val_x),
            "chance_top1": 100.0 * torch.bincount(val_y, minlength=num_classes).max().item() / max(len(val_y), 1),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}

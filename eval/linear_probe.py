"""Linear probing on frozen CLS features: the corrected protocol (default) and the authors' as it runs.

protocol "corrected" (default): features z-scored per dimension with train statistics; one `nn.Linear`
(PyTorch's default Kaiming-uniform init) trained with AdamW + cross-entropy, linear warm-up then cosine decay
to 0 over the whole run (per step); an LR x weight-decay grid, each point trained for a few quick epochs under
the same schedule shortened; the chosen point is trained for the full epochs and the best epoch is kept.
Selection (`select_on`):
- "heldout" (default): a seeded `heldout` fraction of train is set aside; grid point and epoch are chosen
  on it and the val split is evaluated once, with the selected weights;
- "val": the authors' choice: train on all of train, choose grid point and epoch on val, report that
  (optimistically biased; offered to match their numbers).

protocol "authors": github.com/leo1oel/ViT-linear-probing as it actually runs (src/trainer.py, src/models.py,
src/data_utils.py, conf/config.yaml of its last version, commit 02d453d; see docs/eval.md for each line):
- z-score with numpy's population std (ddof 0) plus 1e-5: `(x - mean) / (std + 1e-5)`, train statistics;
- head `LinearProbe`: `kaiming_normal_(weight, mode="fan_out")`, bias 0;
- DataLoader `batch_size=config.get("batch_size", 1024)` -- the config's `probe.batch_size: 2048` is never read,
  so 1024 --, shuffled, the last partial batch kept (`drop_last=True` only in versions up to d85a43e);
- grid (`find_best_hyperparams`): a fresh head per (lr, wd), AdamW at a *constant* LR (scheduler None) for
  `quick_epochs`, val accuracy, the first best kept;
- final run: AdamW(lr, wd) and `cosine_lr(optimizer, lr, warmup_epochs * steps, epochs * steps)` built once,
  but `train_epoch` calls `scheduler(batch_idx)` after each step with the index *within the epoch*: the LR
  sequence restarts every epoch (`authors_lr_factors`) and, with 10 warm-up epochs, never leaves the warm-up
  ramp (at most lr / 10 after the first step, which runs at lr);
- the best val epoch is kept and reported (val selection is part of their code).
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


PROTOCOLS = ("corrected", "authors")


@dataclass(frozen=True)
class ProbeConfig:
    lrs: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3)
    weight_decays: Sequence[float] = (0.0, 1e-6, 1e-3)
    epochs: int = 50
    warmup_epochs: int = 10
    grid_epochs: int = 5  # quick epochs per grid point (corrected: warm-up scaled by grid_epochs / epochs)
    batch_size: int = 2048
    select_on: str = "heldout"  # heldout | val (the authors protocol: val only)
    heldout: float = 0.1
    seed: int = 0
    drop_last: bool = False  # drop each epoch's last partial batch
    protocol: str = "corrected"  # corrected | authors (module docstring)


PRESETS: dict[str, ProbeConfig] = {
    "paper": ProbeConfig(),  # the authors' configured numbers (ImageNet scale: ~626 steps per epoch)
    # small data (the synthetic world, tests): the paper's batch would give 1-2 steps per epoch
    "small": ProbeConfig(lrs=(1e-4, 1e-3, 1e-2), weight_decays=(0.0, 1e-3, 1e-1), epochs=100, warmup_epochs=10,
                         grid_epochs=20, batch_size=256),
    # what their code runs: the configured grid and epochs, the DataLoader's batch 1024 (module docstring)
    "authors": ProbeConfig(batch_size=1024, select_on="val", protocol="authors"),
}
AUTO_PAPER_MIN_SAMPLES = 100_000


def preset(name: str, train_samples: int, **overrides: Any) -> ProbeConfig:
    """A named preset with overrides applied. "auto": under the authors protocol their numbers ("authors"),
    otherwise "paper" from 100k train samples, else "small". The authors protocol selects on val."""
    protocol = overrides.get("protocol") or (PRESETS[name].protocol if name in PRESETS else "corrected")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown probe protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if name == "auto":
        name = "authors" if protocol == "authors" else "paper" if train_samples >= AUTO_PAPER_MIN_SAMPLES else "small"
    if name not in PRESETS:
        raise ValueError(f"unknown probe preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    if protocol == "authors":
        if overrides.get("select_on") not in (None, "val"):
            raise ValueError("the authors protocol chooses grid point and epoch on val (their code); "
                             "--select-on heldout needs --protocol corrected")
        overrides = {**overrides, "select_on": "val"}
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


def authors_extract(extract: Any, vision: dict[str, Any]) -> Any:
    """Their feature extraction (src/feature_extractor.py) as ExtractSettings: `transforms.Resize(224)` (short side,
    torchvision's default bilinear, on the PIL image), `CenterCrop(224)`, ImageNet mean / std (the run's
    `--normalize` still applies), and the HF model's `last_hidden_state[:, 0]`: before the final LayerNorm for a
    CLIPVisionModel (a `pre_norm` export: HF CLIP conversions, and what models.convert.to_hf maps our pre_norm ViTs
    to), after it for ViTModel / Dinov2Model (the other exports)."""
    token = "pre_final_norm" if vision.get("pre_norm") else "final_norm"
    return replace(extract, resize=None, interpolation="bilinear", resize_backend="pil", cls_token=token,
                   variant="authors")


def init_authors_heads(bank: ProbeBank) -> ProbeBank:
    """Their LinearProbe's init (src/models.py): kaiming_normal_(weight, mode="fan_out"), bias 0."""
    with torch.no_grad():
        for head in bank.heads:
            nn.init.kaiming_normal_(head.weight, mode="fan_out")
            nn.init.zeros_(head.bias)
    return bank


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def authors_lr_factors(epochs: int, steps_per_epoch: int, warmup_epochs: int) -> list[float]:
    """LR / base LR of every optimizer step of the authors' final run, as their code applies it.

    `cosine_lr(optimizer, lr, warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)` is built once; after
    each `optimizer.step()` their `train_epoch` calls `scheduler(batch_idx)`, batch_idx counting from 0 in every
    epoch. So a step runs at the value set after the step before: the first step of the run at the optimizer's
    own LR (factor 1), the first of a later epoch at the value of the previous epoch's last index."""
    warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch

    def adjuster(step: int) -> float:  # their _lr_adjuster / base_lr
        if step < warmup:
            return (step + 1) / warmup  # _warmup_lr
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    factors, current = [], 1.0
    for _ in range(epochs):
        for batch_idx in range(steps_per_epoch):
            factors.append(current)
            current = adjuster(batch_idx)
    return factors


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy (%) of (N, C) logits."""
    k = min(k, logits.shape[-1])
    hits = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return 100.0 * hits.float().mean().item()


def steps_per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    steps = samples // batch_size if drop_last else math.ceil(samples / batch_size)
    if steps < 1:
        raise ValueError(f"{samples} train samples make no batch of {batch_size} with drop_last; lower the probe "
                         f"batch size (--probe-batch-size)")
    return steps


def _train(bank: ProbeBank, points: list[tuple[float, float]], x: torch.Tensor, y: torch.Tensor, epochs: int,
           warmup_epochs: float, batch_size: int, generator: torch.Generator, eval_x: torch.Tensor,
           eval_y: torch.Tensor, track_best: bool, factors: Optional[Sequence[float]] = None,
           drop_last: bool = False, lr_trace: Optional[list[float]] = None) -> tuple[list[float], Optional[dict], int]:
    """Train every head of `bank` on (x, y); returns (final eval accuracy per head, best state, best epoch).

    The LR of a step is base LR x `factors[step]` when given, else x lr_factor (warm-up + cosine over the run).
    With `track_best` (a single head), the weights of the epoch with the best eval accuracy are kept.
    `lr_trace` collects the LR of the first head at every step."""
    groups = [{"params": list(h.parameters()), "lr": lr, "weight_decay": wd, "base_lr": lr}
              for h, (lr, wd) in zip(bank.heads, points)]
    opt = torch.optim.AdamW(groups)
    per_epoch = steps_per_epoch(len(x), batch_size, drop_last)
    total, warmup = epochs * per_epoch, round(warmup_epochs * per_epoch)
    if factors is not None and len(factors) < total:
        raise ValueError(f"{len(factors)} LR factors for {total} steps")
    step, best, best_state, best_epoch = 0, -1.0, None, 0
    accs: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, per_epoch * batch_size, batch_size):
            idx = perm[start:start + batch_size]
            factor = lr_factor(step, total, warmup) if factors is None else factors[step]
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            if lr_trace is not None:
                lr_trace.append(opt.param_groups[0]["lr"])
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


def authors_zscore_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their FeatureDataset: numpy `mean(0)`, `std(0)` (population, ddof 0), divided by `std + 1e-5`."""
    std, mean = torch.std_mean(x, dim=0, correction=0, keepdim=True)  # (1, D) each
    return mean, std + 1e-5


def _chance(y: torch.Tensor, num_classes: int) -> float:
    return 100.0 * torch.bincount(y, minlength=num_classes).max().item() / max(len(y), 1)


def _config_dict(cfg: ProbeConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, cfg: ProbeConfig = ProbeConfig(), device: str = "cpu") -> dict[str, Any]:
    """Fit the probe on train features (N, D) / labels (N,) and report val top-1 / top-5 (%)."""
    if cfg.protocol == "authors":
        return authors_linear_probe(train_x, train_y, val_x, val_y, num_classes, cfg, device)
    if cfg.protocol != "corrected":
        raise ValueError(f"unknown probe protocol {cfg.protocol!r}; choose from {', '.join(PROTOCOLS)}")
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
    batch = min(cfg.batch_size, len(fit_x)) if not cfg.drop_last else cfg.batch_size

    # grid: every (lr, wd) for grid_epochs, chosen on the selection split
    points = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    torch.manual_seed(cfg.seed)
    bank = ProbeBank(dim, num_classes, len(points)).to(device)
    warmup = cfg.warmup_epochs if cfg.warmup_epochs < cfg.epochs else 0.2 * cfg.epochs  # short runs: 20% warm-up
    warm = warmup * cfg.grid_epochs / max(cfg.epochs, 1)
    grid_acc, _, _ = _train(bank, points, fit_x, fit_y, cfg.grid_epochs, warm, batch, gen, sel_x, sel_y, False,
                            drop_last=cfg.drop_last)
    best_point = points[max(range(len(points)), key=lambda i: grid_acc[i])]

    # the chosen point for the full schedule, keeping the best epoch on the selection split
    torch.manual_seed(cfg.seed)
    final = ProbeBank(dim, num_classes, 1).to(device)
    _, best_state, best_epoch = _train(final, [best_point], fit_x, fit_y, cfg.epochs, warmup, batch, gen, sel_x,
                                       sel_y, True, drop_last=cfg.drop_last)
    final.load_state_dict(best_state)
    top1, top5 = evaluate(final, val_n, val_y, 1)[0], evaluate(final, val_n, val_y, 5)[0]
    return {"top1": top1, "top5": top5 if num_classes > 5 else None,
            "selection_top1": evaluate(final, sel_x, sel_y, 1)[0], "best_epoch": best_epoch,
            "lr": best_point[0], "weight_decay": best_point[1],
            "grid": [{"lr": lr, "weight_decay": wd, "selection_top1": acc} for (lr, wd), acc in zip(points, grid_acc)],
            "train_samples": len(fit_x), "selection_samples": len(sel_x), "val_samples": len(val_x),
            "chance_top1": _chance(val_y, num_classes), "protocol": "corrected", "config": _config_dict(cfg)}


def authors_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                         num_classes: int, cfg: ProbeConfig = PRESETS["authors"], device: str = "cpu",
                         lr_trace: Optional[list[float]] = None) -> dict[str, Any]:
    """leo1oel/ViT-linear-probing's train_and_evaluate (module docstring): grid at constant LR on val, then the
    chosen point with their per-epoch-restarting schedule, the best val epoch reported. `lr_trace` collects the
    LR of every step of the final run."""
    if cfg.select_on != "val":
        raise ValueError("the authors protocol chooses grid point and epoch on val (their code)")
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    val_x, val_y = val_x.float().to(device), val_y.long().to(device)
    mean, std = authors_zscore_stats(train_x)
    fit_x, val_n = (train_x - mean) / std, (val_x - mean) / std
    dim, per_epoch = fit_x.shape[1], steps_per_epoch(len(fit_x), cfg.batch_size, cfg.drop_last)

    torch.manual_seed(cfg.seed)
    final = init_authors_heads(ProbeBank(dim, num_classes, 1).to(device))  # built before the grid, as theirs
    points = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    bank = init_authors_heads(ProbeBank(dim, num_classes, len(points)).to(device))
    constant = [1.0] * (cfg.grid_epochs * per_epoch)  # find_best_hyperparams passes scheduler=None
    grid_acc, _, _ = _train(bank, points, fit_x, train_y, cfg.grid_epochs, 0, cfg.batch_size, gen, val_n, val_y,
                            False, factors=constant, drop_last=cfg.drop_last)
    best_point = points[max(range(len(points)), key=lambda i: grid_acc[i])]  # `val_acc > best_acc`: first best

    factors = authors_lr_factors(cfg.epochs, per_epoch, cfg.warmup_epochs)
    _, best_state, best_epoch = _train(final, [best_point], fit_x, train_y, cfg.epochs, 0, cfg.batch_size, gen,
                                       val_n, val_y, True, factors=factors, drop_last=cfg.drop_last,
                                       lr_trace=lr_trace)
    final.load_state_dict(best_state)
    top1, top5 = evaluate(final, val_n, val_y, 1)[0], evaluate(final, val_n, val_y, 5)[0]
    lr = best_point[0]
    return {"top1": top1, "top5": top5 if num_classes > 5 else None, "selection_top1": top1,
            "best_epoch": best_epoch, "lr": lr, "weight_decay": best_point[1],
            "grid": [{"lr": p[0], "weight_decay": p[1], "selection_top1": acc} for p, acc in zip(points, grid_acc)],
            "train_samples": len(fit_x), "selection_samples": len(val_x), "val_samples": len(val_x),
            "chance_top1": _chance(val_y, num_classes), "protocol": "authors", "steps_per_epoch": per_epoch,
            # the LR their final run actually used: the first step at lr, then a ramp restarting every epoch
            "final_lr": {"first_step": lr * factors[0], "max_after_first_step": lr * max(factors[1:], default=0.0),
                         "last_step": lr * factors[-1]},
            "config": _config_dict(cfg)}

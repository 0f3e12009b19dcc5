#!/usr/bin/env python
"""How hard is each factor of the synthetic world? Two baselines that need no pretraining.

1. a linear probe on raw pixels (32 px, z-scored) per factor: what a feature with no learning already gives;
2. a linear probe on the class token of the micro ViT at its random init (what the architecture gives unlearned);
3. the micro ViT of the tiny configs trained *supervised* on one factor for a given number of steps: an upper
   bound on what a pretraining objective can reach on that factor with the demo's model and budget.

    python benchmarks/synthetic_difficulty.py --data data_cache/synthetic --factor shape --steps 620 \\
        | tee benchmarks/results/synthetic_difficulty_cpu.txt

Chance is the majority-class rate of the val split.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.data import EvalDataError, decode_sample, iter_samples, open_eval_data  # noqa: E402
from eval.factors import FACTOR_NAMES  # noqa: E402
from models.vit import ViTConfig, VisionTransformer  # noqa: E402


def load_split(data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 images, (N, F) factor labels."""
    images, factors = [], []
    for _, _, raw in iter_samples(data.shards(split)):
        sample = decode_sample(raw, data)
        images.append(sample["image"])
        factors.append(sample["factors"])
    return torch.stack(images), torch.tensor(factors)


def fit_linear(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, classes: int,
               epochs: int = 200) -> float:
    """Full-batch AdamW softmax regression on z-scored inputs; val top-1."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std  # (N, D)
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return head(x_val).argmax(1)


def random_init_features(images: torch.Tensor, init: str, patch_size: int) -> torch.Tensor:
    """(N, W) class tokens of the micro ViT at its (seeded) random init."""
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(size="micro", patch_size=patch_size, image_size=images.shape[-1],
                                      pre_norm=True, init=init)).eval()
    with torch.no_grad():
        return torch.cat([vit((chunk.float() / 255 - 0.5) / 0.25) for chunk in images.split(512)])


def supervised_vit(images: torch.Tensor, labels: torch.Tensor, val_images: torch.Tensor, classes: int, steps: int,
                   batch: int, init: str, log, patch_size: int = 8) -> torch.Tensor:
    """The tiny configs' micro ViT/8 + a linear head, AdamW lr 1e-3 warm-up + cosine, flips; val predictions."""
    size = images.shape[-1]
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(size="micro", patch_size=patch_size, image_size=size, pre_norm=True, init=init))
    head = torch.nn.Linear(vit.width, classes)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    x_all = (images.float() / 255 - 0.5) / 0.25  # (N, 3, S, S)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x_all), (batch,))
        x = x_all[idx]
        flip = torch.rand(batch) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = F.cross_entropy(head(vit(x)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.3f}")
    vit.eval()
    with torch.no_grad():
        x_val = (val_images.float() / 255 - 0.5) / 0.25
        return torch.cat([head(vit(chunk)).argmax(1) for chunk in x_val.split(256)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data_cache/synthetic", help="the synthetic world's folder")
    p.add_argument("--factor", default="shape", help=f"factor for the supervised ViT ({', '.join(FACTOR_NAMES)})")
    p.add_argument("--steps", type=int, default=620, help="supervised steps (0: skip the ViT)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--init", default="scaled", help="ViT init (trunc_normal | scaled)")
    p.add_argument("--patch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.factor not in FACTOR_NAMES:
        raise SystemExit(f"--factor must be one of {', '.join(FACTOR_NAMES)}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log(f"# python benchmarks/synthetic_difficulty.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"# {platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        data = open_eval_data(args.data, label=args.factor)
    except EvalDataError as e:
        raise SystemExit(f"error: {e}")
    if data.kind != "synthetic":
        raise SystemExit(f"{args.data} is not a synthetic world (needs .json factor records)")
    train_x, train_f = load_split(data, "train")
    val_x, val_f = load_split(data, "val")
    log(f"train {len(train_x)} / val {len(val_x)} images at {train_x.shape[-1]} px, world spec "
        f"{data.world.get('spec', 'format-1 defaults')}")
    pixels_train = F.interpolate(train_x.float(), size=32, mode="area").flatten(1)  # (N, 3*32*32)
    pixels_val = F.interpolate(val_x.float(), size=32, mode="area").flatten(1)
    init_train, init_val = (random_init_features(x, args.init, args.patch_size) for x in (train_x, val_x))
    log(f"{'factor':10s} {'classes':>7s} {'chance':>7s} {'pixel probe':>12s} {'init ViT probe':>15s}")
    for f, name in enumerate(FACTOR_NAMES):
        classes = int(max(train_f[:, f].max(), val_f[:, f].max())) + 1
        chance = torch.bincount(val_f[:, f], minlength=classes).max().item() / len(val_f)
        pixel = fit_linear(pixels_train, train_f[:, f], pixels_val, classes)
        init = fit_linear(init_train, train_f[:, f], init_val, classes)
        log(f"{name:10s} {classes:7d} {100 * chance:6.1f}% {100 * (pixel == val_f[:, f]).float().mean():11.1f}% "
            f"{100 * (init == val_f[:, f]).float().mean():14.1f}%")
    if args.steps:
        f = FACTOR_NAMES.index(args.factor)
        classes = int(max(train_f[:, f].max(), val_f[:, f].max())) + 1
        log(f"supervised micro ViT/{args.patch_size} on {args.factor}: {args.steps} steps of {args.batch}, "
            f"init {args.init}")
        start = time.time()
        pred = supervised_vit(train_x, train_f[:, f], val_x, classes, args.steps, args.batch, args.init, log,
                              args.patch_size)
        log(f"supervised val top-1 on {args.factor}: {100 * (pred == val_f[:, f]).float().mean():.1f}% "
            f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

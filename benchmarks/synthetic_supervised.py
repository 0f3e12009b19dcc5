#!/usr/bin/env python
"""The micro ViT trained supervised on the shape factor of a synthetic world: how learnable is shape at a budget?

Each positional argument after the world is one run, written as Python keyword arguments:
lr, steps, patch (8), batch (64), init (scaled), size (micro), wd (0.05), warm (30). AdamW, linear warm-up +
cosine, no augmentation, samples drawn with replacement from the world's train split; val top-1 printed.
The sweep in benchmarks/results/embedded_default_sweep_cpu.md was made with it:

    python benchmarks/synthetic_supervised.py data_cache/sweep/easiest_64 "lr=1e-3,steps=280" "lr=3e-3,steps=280"
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic_difficulty import load_split  # noqa: E402
from eval.data import open_eval_data  # noqa: E402
from models.vit import ViTConfig, VisionTransformer  # noqa: E402

SHAPE = 0  # FACTOR_NAMES index


def run(train_x, train_y, val_x, val_y, name, lr, steps, patch=8, batch=64, init="scaled", size="micro", wd=0.05,
        warm=30):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(size=size, patch_size=patch, image_size=train_x.shape[-1], pre_norm=True,
                                      init=init))
    head = torch.nn.Linear(vit.width, 14)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr, weight_decay=wd)
    x_all = (train_x.float() / 255 - 0.5) / 0.25  # (N, 3, S, S)
    start = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x_all), (batch,))
        loss = F.cross_entropy(head(vit(x_all[idx])), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vit.eval()
    with torch.no_grad():
        pred = torch.cat([head(vit(c)).argmax(1) for c in ((val_x.float() / 255 - 0.5) / 0.25).split(256)])
    print(f"{name} lr {lr} steps {steps} patch {patch} batch {batch} init {init} size {size}: loss {loss.item():.3f} "
          f"val {100 * (pred == val_y).float().mean():.1f}% ({time.time() - start:.0f}s)", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    data = open_eval_data(argv[0], label="shape")
    tx, tf = load_split(data, "train")
    vx, vf = load_split(data, "val")
    for spec in argv[1:]:
        run(tx, tf[:, SHAPE], vx, vf[:, SHAPE], os.path.basename(argv[0].rstrip("/")), **eval(f"dict({spec})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Sweep the synthetic world's difficulty knobs with the model-free baselines of synthetic_difficulty.py.

For each variant: write the world (`python -m data.synthetic ...`), then run
`benchmarks/synthetic_difficulty.py` on it (pixel probe, random-init ViT probe, supervised micro ViT on shape).
The supervised ViT is the upper bound a pretraining objective can reach with the demo's model and budget, so a
world worth pretraining on is one where it learns shape well within the budget.

    python benchmarks/synthetic_sweep.py --variants base,big,big_plain --steps 280 \\
        | tee benchmarks/results/synthetic_sweep_cpu.txt
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> python -m data.synthetic arguments (on top of --samples/--val-samples/--image-size)
VARIANTS: dict[str, list[str]] = {
    "base": [],  # the original world (format-1 defaults)
    "big": ["--object-scale", "1.6"],
    "big_calm": ["--object-scale", "1.6", "--styles", "plain,gradient,stripes"],
    "big_calm_upright": ["--object-scale", "1.6", "--styles", "plain,gradient,stripes", "--max-rotation", "60"],
    "big_calm_fewwords": ["--object-scale", "1.6", "--styles", "plain,gradient,stripes", "--word-prob", "0.4"],
    "big_plain": ["--object-scale", "1.6", "--styles", "plain"],
    "mid_calm": ["--object-scale", "1.3", "--styles", "plain,gradient,stripes"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--val-samples", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=280, help="supervised ViT steps of 64 (the demo's budget)")
    p.add_argument("--work", default="data_cache/sweep", help="where the worlds are written")
    args = p.parse_args(argv)
    summary = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        out = ROOT / args.work / f"{name}_{args.image_size}"
        gen = [sys.executable, "-m", "data.synthetic", "--out", str(out), "--samples", str(args.samples),
               "--val-samples", str(args.val_samples), "--image-size", str(args.image_size), "--shard-size", "1000",
               "--workers", "2", "--overwrite", *VARIANTS[name]]
        print(f"\n## {name}: {' '.join(gen[1:])}", flush=True)
        start = time.time()
        subprocess.run(gen, cwd=ROOT, check=True)
        print(f"# generated {args.samples + args.val_samples} samples in {time.time() - start:.1f} s", flush=True)
        cmd = [sys.executable, "benchmarks/synthetic_difficulty.py", "--data", str(out), "--factor", "shape",
               "--steps", str(args.steps), "--patch-size", str(args.patch_size)]
        text = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        print(text, end="", flush=True)
        shape = re.search(r"^shape\s+\d+\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%", text, re.M)
        sup = re.search(r"supervised val top-1 on shape: ([\d.]+)%", text)
        summary.append((name, *shape.groups(), sup.group(1) if sup else "-"))
    print(f"\n{'variant':20s} {'chance':>7s} {'pixel':>7s} {'init ViT':>9s} {'supervised':>11s}   (shape, val top-1 %)")
    for row in summary:
        print(f"{row[0]:20s} {row[1]:>7s} {row[2]:>7s} {row[3]:>9s} {row[4]:>11s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Evaluate an exported encoder: linear probe, kNN, zero-shot, retrieval, embedding analysis.

    python launch/eval.py --checkpoint runs/tiny_clip/export/step_0000200 --data data_cache/synthetic --out evals/clip
    python launch/eval.py --checkpoint EXPORT --tasks linear_probe,knn --data /data/imagenet_shards --out DIR \\
        --probe-preset paper [--select-on val]          # the corrected probe with the authors' numbers
    python launch/eval.py --checkpoint EXPORT --tasks linear_probe,knn --data /data/imagenet_shards --out DIR \\
        --protocol authors --knn-preset dino            # their probe code as it runs; DINO's eval_knn.py
    python launch/eval.py --checkpoint CLIP_EXPORT --compare DINO_EXPORT --tasks embedding \\
        --data data_cache/synthetic --out evals/clip_vs_dino   # factor sensitivity of both + disagreement pairs

Writes DIR/results.json, DIR/results.md and PNG figures. `--data` takes the synthetic world's folder (label:
a factor, default shape) or labeled shards (classes.json + {train,val}-NNNNNN.tar with cls). Features are
cached (default ~/.cache/clipdino/eval_features, or $CLIPDINO_EVAL_CACHE; --no-cache to skip). See docs/eval.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Optional

from _bootstrap import OneLineParser  # (and the repo root first on sys.path: the `eval` package, not this file)


def build_parser() -> argparse.ArgumentParser:
    from eval.context import EvalSettings

    def default(name: str) -> str:  # the one set of defaults is EvalSettings'
        return f" (default: {getattr(EvalSettings, name)})"

    # an option left out is absent from the namespace, so EvalSettings' own default applies
    p = OneLineParser(prog="launch/eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="synthetic world folder or labeled shards folder")
    p.add_argument("--out", required=True, help="output folder for results.json / results.md / PNGs")
    p.add_argument("--tasks", help="comma-separated (default: all)")
    p.add_argument("--label", help="synthetic world: factor used as class label (default shape)")
    p.add_argument("--compare", help="second export for the embedding analysis (disagreement pairs): model B")
    p.add_argument("--name", help="display name of the model (default: objective@step)")
    p.add_argument("--compare-name", help="display name of the compared model")
    p.add_argument("--image-size", type=int, help="eval resolution (default: the export's vision.image_size)")
    p.add_argument("--normalize", choices=("imagenet", "export"),
                   help="mean/std: ImageNet's (the probing protocol) or the export's training values" +
                   default("normalize"))
    p.add_argument("--protocol", choices=("corrected", "authors"),
                   help="linear probe: corrected, or authors = leo1oel/ViT-linear-probing as it runs (bilinear "
                   "resize, HF last_hidden_state[:, 0], LR restarting every epoch, batch 1024, val selection; "
                   "docs/eval.md)" + default("protocol"))
    p.add_argument("--probe-preset", choices=("auto", "paper", "small"),
                   help="paper: the authors' configured grid/epochs/batch; small: for <100k train samples; auto "
                   "picks (with --protocol authors: their numbers as run)" + default("probe_preset"))
    p.add_argument("--select-on", choices=("heldout", "val"),
                   help="choose probe grid point + epoch on held-out train or on val (the authors') (default: "
                   "heldout; val with --protocol authors)")
    p.add_argument("--probe-epochs", type=int)
    p.add_argument("--probe-grid-epochs", type=int)
    p.add_argument("--probe-batch-size", type=int)
    p.add_argument("--probe-drop-last", action="store_true", help="drop each epoch's last partial probe batch")
    p.add_argument("--knn-preset", choices=("default", "dino"),
                   help="default: k 20 on the shared features; dino: eval_knn.py (PIL bicubic resize 256, crop "
                   "224, k 10/20/100/200)" + default("knn_preset"))
    p.add_argument("--knn-k", type=int, help="one k instead of the preset's (default: 20; dino: 10,20,100,200)")
    p.add_argument("--knn-temperature", type=float, help=default("knn_temperature"))
    p.add_argument("--pairs-per-factor", type=int,
                   help="controlled pairs per factor (synthetic world)" + default("pairs_per_factor"))
    p.add_argument("--max-pair-images", type=int,
                   help="val images for all-pairs statistics" + default("max_pair_images"))
    p.add_argument("--factor-probe-epochs", type=int, help=default("factor_probe_epochs"))
    p.add_argument("--thresholds", help="disagreement: A high, B low, B high, A low (the authors' CLIP/DINO values)" +
                   default("thresholds"))
    p.add_argument("--top-pairs", type=int, help=default("top_pairs"))
    p.add_argument("--batch-size", type=int, help="images per forward pass" + default("batch_size"))
    p.add_argument("--workers", type=int, help="decoding processes (default: up to 4)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N" + default("device"))
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 autocast (CUDA only)" + default("precision"))
    p.add_argument("--cache-dir", help="feature cache folder")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, help=default("seed"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from eval.context import EvalSettings, env_cache_dir
    from eval.data import EvalDataError
    from eval.runner import run_eval
    from eval.tasks import parse_tasks

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        given = dict(vars(args))  # the options given; EvalSettings has the defaults
        if "tasks" in given:
            given["tasks"] = parse_tasks(given["tasks"])
        given["cache_dir"] = None if given.get("no_cache") else (given.get("cache_dir") or env_cache_dir())
        given["progress"] = not given.get("no_progress") and sys.stderr.isatty()
        settings = EvalSettings(**{f.name: given[f.name] for f in fields(EvalSettings) if f.name in given})
        results = run_eval(settings, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, EvalDataError, OSError) as e:
        if os.environ.get("CLIPDINO_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for key, value in results["summary"].items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {args.out}/results.json and results.md")
    if results["failed"]:
        print(f"error: task(s) failed: {', '.join(results['failed'])} (details in {args.out}/results.md)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

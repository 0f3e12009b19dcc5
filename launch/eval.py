#!/usr/bin/env python
"""Evaluate an exported encoder: linear probe, kNN, zero-shot, retrieval, embedding analysis.

    python launch/eval.py --checkpoint runs/tiny_clip/export/step_0000200 --data data_cache/synthetic --out evals/clip
    python launch/eval.py --checkpoint EXPORT --tasks linear_probe,knn --data /data/imagenet_shards --out DIR \\
        --probe-preset paper [--select-on val]          # the authors' ImageNet protocol (val selection: theirs)
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
from typing import Optional

import _bootstrap  # noqa: F401  (repo root first on sys.path: the `eval` package, not this file)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    from eval.context import DEFAULT_TASKS

    p = _OneLineParser(prog="launch/eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="synthetic world folder or labeled shards folder")
    p.add_argument("--out", required=True, help="output folder for results.json / results.md / PNGs")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated (default: all)")
    p.add_argument("--label", help="synthetic world: factor used as class label (default shape)")
    p.add_argument("--compare", help="second export for the embedding analysis (disagreement pairs): model B")
    p.add_argument("--name", help="display name of the model (default: objective@step)")
    p.add_argument("--compare-name", help="display name of the compared model")
    p.add_argument("--image-size", type=int, help="eval resolution (default: the export's vision.image_size)")
    p.add_argument("--normalize", choices=("imagenet", "export"), default="imagenet",
                   help="mean/std: ImageNet's (the probing protocol, default) or the export's training values")
    p.add_argument("--probe-preset", choices=("auto", "paper", "small"), default="auto",
                   help="paper: the authors' grid/epochs/batch; small: for <100k train samples; auto picks")
    p.add_argument("--select-on", choices=("heldout", "val"), default="heldout",
                   help="choose probe grid point + epoch on held-out train (default) or on val (the authors')")
    p.add_argument("--probe-epochs", type=int)
    p.add_argument("--probe-grid-epochs", type=int)
    p.add_argument("--probe-batch-size", type=int)
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--pairs-per-factor", type=int, default=64, help="controlled pairs per factor (synthetic world)")
    p.add_argument("--max-pair-images", type=int, default=2000, help="val images for all-pairs statistics")
    p.add_argument("--factor-probe-epochs", type=int, default=30)
    p.add_argument("--thresholds", default="0.7,0.5,0.8,0.5",
                   help="disagreement: A high, B low, B high, A low (default: the authors' CLIP/DINO values)")
    p.add_argument("--top-pairs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (CUDA only)")
    p.add_argument("--cache-dir", help="feature cache folder")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
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

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = EvalSettings(
            checkpoint=args.checkpoint, data=args.data, out=args.out, tasks=parse_tasks(args.tasks), label=args.label,
            compare=args.compare, name=args.name, compare_name=args.compare_name, image_size=args.image_size,
            normalize=args.normalize, probe_preset=args.probe_preset, select_on=args.select_on,
            probe_epochs=args.probe_epochs, probe_grid_epochs=args.probe_grid_epochs,
            probe_batch_size=args.probe_batch_size, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
            pairs_per_factor=args.pairs_per_factor, max_pair_images=args.max_pair_images,
            factor_probe_epochs=args.factor_probe_epochs, thresholds=args.thresholds, top_pairs=args.top_pairs,
            batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
            cache_dir=None if args.no_cache else (args.cache_dir or env_cache_dir()),
            progress=not args.no_progress and sys.stderr.isatty(), seed=args.seed)
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

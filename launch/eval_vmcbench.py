#!/usr/bin/env python
"""Evaluate a VLM (a Hugging Face LLaVA folder) on VMCBench, scored as lmms-eval and VLMEvalKit publish it.

    python launch/eval_vmcbench.py --model runs/vlm/export/step_0005000 --data /data/VMCBench --out evals/vmc
    python launch/eval_vmcbench.py --model VLM_DIR --data /data/VMCBench --out DIR --split test --mode both \\
        --device cuda --batch-size 16
    python launch/eval_vmcbench.py --responses lmms_eval_samples.jsonl --data /data/VMCBench --out DIR  # no model

Writes DIR/results.json (overall, groups micro = lmms-eval / macro = VLMEvalKit, categories, unparsed, n),
results.md, predictions.jsonl and groups.png. `--data`: the dataset folder as published (data/dev-*.parquet,
else data/tsv/VMCBench_DEV.tsv) or one .parquet / .tsv file. `--responses`: a JSONL of {"index", "response"}
from any tool, scored with the same parser. Unparsed answers count as wrong unless --random-fallback SEED
(the harnesses' random letter; seed 0 = lmms-eval's default). See docs/vlm.md, "VMCBench evaluation".
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from _bootstrap import OneLineParser  # (and the repo root first on sys.path: the `eval` package, not launch/eval.py)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="launch/eval_vmcbench.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face LLaVA folder (config.json model_type llava + processor)")
    source.add_argument("--responses", help="JSONL of {\"index\", \"response\"} to score without a model")
    p.add_argument("--data", required=True, help="VMCBench folder (as published) or one .parquet / .tsv file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="dev", choices=("dev", "test"), help="(default: dev, as lmms-eval)")
    p.add_argument("--limit", type=int, help="evaluate N questions, evenly spaced through the split")
    p.add_argument("--random-fallback", type=int, metavar="SEED",
                   help="unparsed answers get a seeded random letter, as the harnesses do (default: scored wrong)")
    p.add_argument("--mode", default="generate", choices=("generate", "likelihood", "both"),
                   help="generate + parse, option likelihood of A-D, or both (default: generate)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy generation length (default: 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="model weights (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--name", help="display name (default: RUN@step_N for a run export, else the folder's name)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from eval.vmcbench import evaluate_vmcbench  # torch / transformers load only when a model is run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        results = evaluate_vmcbench(
            args.model, args.data, args.out, split=args.split, limit=args.limit, mode=args.mode,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
            random_fallback=args.random_fallback, responses=args.responses, name=args.name,
            progress=not args.no_progress and sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:  # VMCBenchDataError / VMCBenchModelError are ValueErrors
        if os.environ.get("CLIPDINO_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for key, value in results["summary"].items():
        print(f"{key}: {value:.2f}")
    if results["mode"] != "likelihood":
        print(f"unparsed: {results['unparsed']} of {results['n']}")
    print(f"wrote {args.out}/results.json, results.md, predictions.jsonl, groups.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmarks of the stack; each subcommand lives in launch/bench_<name>.py.

    python launch/bench.py train --model vit_b16 --objective clip --batch 8 --vs open_clip --json out.json
    python launch/bench.py data  ...        (loader throughput)
    python launch/bench.py loss  ...        (loss kernels: time and memory)
    python launch/bench.py eval  ...        (evaluation harness: feature extraction, probe time)
    python launch/bench.py vlm   --llm tiny-llama --vision tiny --json out.json   (VLM stage-2 step vs transformers)
    python launch/bench.py all   --preset cpu --out DIR   (every one of them, one markdown table: bench_all.py)

Each module defines `add_parser(subparsers)`; its parser sets `func(args) -> exit code` and
optionally `check(parser, args)` for argument validation. Results go to stdout and, with
`--json FILE`, to a JSON file; saved results live in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional

import _bootstrap  # noqa: F401  (repo root on sys.path)

SUBCOMMANDS = ("train", "data", "loss", "eval", "vlm", "all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        if importlib.util.find_spec(f"bench_{name}") is not None:
            importlib.import_module(f"bench_{name}").add_parser(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # the subcommand parses its own arguments (bench_eval)
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "check", None):
        args.check(parser, args)
    from train.config_loader import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

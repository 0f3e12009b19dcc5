"""`python launch/bench.py eval ...`: the evaluation harness benchmark (eval/bench.py), under the common bench CLI.

    python launch/bench.py eval --models tiny,base --out benchmarks/results/eval_cpu
"""
from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    sub = commands.add_parser("eval", help="feature-extraction images/s and linear-probe wall time (eval/bench.py)",
                              add_help=False)  # --help goes through to eval.bench
    sub.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace) -> int:
    from eval.bench import main

    return main(args.rest)

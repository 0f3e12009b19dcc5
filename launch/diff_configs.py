#!/usr/bin/env python
"""Print every difference between two configs or runs (YAML files or run folders with config.yaml).

    python launch/diff_configs.py launch/configs/pretrain/tiny_clip.yaml launch/configs/pretrain/tiny_dino.yaml
    python launch/diff_configs.py runs/tiny_clip runs/tiny_dino

Both sides are fully merged (extends + defaults), so the diff shows what actually differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from train.config_loader import ConfigError, diff_configs, load_config


def resolve(path: str) -> Path:
    p = Path(path)
    return p / "config.yaml" if p.is_dir() else p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="config YAML or run folder")
    parser.add_argument("b", help="config YAML or run folder")
    args = parser.parse_args(argv)
    try:
        cfg_a, cfg_b = load_config(resolve(args.a)), load_config(resolve(args.b))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rows = diff_configs(cfg_a, cfg_b)
    if not rows:
        print("no differences")
        return 0
    width = max(len(k) for k, _, _ in rows)
    print(f"{'key':<{width}}  {args.a}  |  {args.b}")
    for key, va, vb in rows:
        print(f"{key:<{width}}  {va!r}  |  {vb!r}")
    print(f"\n{len(rows)} difference(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Pretrain a vision encoder with any objective, on 1 process or many.

    python launch/pretrain.py --config launch/configs/pretrain/tiny_clip.yaml [key=value ...]
    deepspeed --num_gpus 8 launch/pretrain.py --config launch/configs/pretrain/vitb16_dino_datacomp10m.yaml
    torchrun --nproc_per_node 8 launch/pretrain.py --config ...        srun python launch/pretrain.py --config ...

Overrides are dotted keys: data.train=SHARDS schedule.steps=N run.dir=PATH checkpoint.every=N seed=N resume=auto
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import _bootstrap  # noqa: F401

from train.distributed import prepare_environment

prepare_environment()  # before deepspeed is imported: CPU accelerator + gloo when there is no GPU


def main(argv: list[str] | None = None, description: str = __doc__, config_cls=None, choices=None,
         config_help: str = "YAML experiment file (launch/configs/pretrain/*.yaml)") -> int:
    """Parse `--config FILE key=value ...`, load the typed config (config_cls: PretrainConfig by default) and
    train; errors a user can fix are one line (exit 1 or 2)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 schedule.steps=100")
    args = parser.parse_args(argv)

    from data.shards import DataError
    from train.config_loader import ConfigError, load_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides, cls=config_cls, choices=choices)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    from train.trainer import NonFiniteLossError, train

    try:
        summary = train(cfg)
    except (DataError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        if os.environ.get("CLIPDINO_DEBUG"):
            raise
        print(f"error: {e}  (set CLIPDINO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[clipdino] done: {summary['steps']} steps, {summary['samples_seen']} samples -> {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

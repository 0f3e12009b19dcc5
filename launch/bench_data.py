#!/usr/bin/env python
"""`python launch/bench.py data`: loader throughput (decode + augmentation + batching), images/s.

    python launch/bench.py data --backend cpu  --task dino --threads 1 --json out.json
    python launch/bench.py data --backend dali --task dino --threads 1 [--shards 'DIR/*.tar']

Times the training loader exactly as the trainer builds it for one rank (CPU backend: `data.workers` =
--threads loader processes, one torch thread each; DALI backend: --threads DALI CPU threads, CPU-only
decoding here) on --batches batches after --warmup. Without --shards it reads a synthetic world of
--samples images at --source-size px (generated once into --cache). DINO: 2 global crops at
--image-size + --local-crops local crops at --local-size (the paper config: 2 x 224 + 10 x 96).
Reports images/s in total and per thread, and the CPU seconds the loader processes used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import _bootstrap  # noqa: F401  (repo root on sys.path)
import torch

TEXT_LENGTH = 77


def byte_tokens(texts: list[str]) -> torch.Tensor:
    """A picklable stand-in tokenizer: utf-8 bytes, padded/truncated to 77 ids -> (N, 77)."""
    out = torch.zeros(len(texts), TEXT_LENGTH, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = list(text.encode("utf-8"))[:TEXT_LENGTH]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def bench_world(cache: Path, samples: int, size: int) -> str:
    """Shards of a synthetic world (made once per (samples, size)); returns their glob."""
    from data.synthetic import generate_world

    folder = cache / f"world_{samples}x{size}"
    if not (folder / "sizes.json").is_file():
        print(f"[bench] generating {samples} synthetic images at {size} px -> {folder}", file=sys.stderr)
        generate_world(folder, samples=samples, val_samples=1, shard_size=max(1, min(64, samples // 8)),
                       image_size=size, seed=0, workers=min(4, os.cpu_count() or 1), progress=False, overwrite=True)
    return str(folder / "train-*.tar")


def make_processor(args: argparse.Namespace):
    from data.loader import SampleProcessor
    from data.transforms import ClipTransform, DinoMultiCrop

    if args.task == "clip":
        return SampleProcessor(clip_transform=ClipTransform(args.image_size), text_encoder=byte_tokens)
    return SampleProcessor(dino_transform=DinoMultiCrop(args.image_size, args.local_size, 2, args.local_crops))


def make_loader(args: argparse.Namespace, shards: list[str], processor):
    if args.backend == "cpu":
        from data.loader import PretrainLoader

        return PretrainLoader(shards, processor, args.batch, seed=0, workers=args.threads,
                              shuffle_buffer=args.shuffle_buffer)
    from data.dali.index import ensure_indexes
    from data.dali.loader import DaliLoader

    return DaliLoader(shards, ensure_indexes(shards), processor, args.batch, seed=0, threads=args.threads,
                      shuffle_buffer=args.shuffle_buffer, decoder="cpu")


def cpu_seconds() -> Optional[float]:
    """CPU time (user + system) of this process and its live children (loader workers); Linux only."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        total = time.process_time()
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid != me:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[1] == me:  # ppid
                    total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return total
    except (OSError, ValueError, AttributeError):
        return None


def cmd_data(args: argparse.Namespace) -> int:
    from data.shards import DataError, expand_shards

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    try:
        pattern = args.shards or bench_world(Path(args.cache), args.samples, args.source_size)
        shards = expand_shards(pattern)
        loader = make_loader(args, shards, make_processor(args))
        batches = iter(loader)
        for _ in range(args.warmup):
            next(batches)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        images = 0
        for _ in range(args.batches):
            images += len(next(batches))
        elapsed, cpu1 = time.perf_counter() - t0, cpu_seconds()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    del batches  # stops the loader workers
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    report: dict[str, Any] = {
        "backend": args.backend, "task": args.task, "images_per_s": images / elapsed,
        "images_per_s_per_thread": images / elapsed / args.threads, "threads": args.threads,
        "cpu_seconds": cpu, "images_per_cpu_s": images / cpu if cpu else None, "images": images,
        "elapsed_s": elapsed, "batch": args.batch, "batches": args.batches, "warmup": args.warmup,
        "image_size": args.image_size,
        "crops": ([2, args.image_size, args.local_crops, args.local_size] if args.task == "dino" else None),
        "decoder": "cpu" if args.backend == "dali" else "pil", "shards": pattern, "shard_count": len(shards),
        "source_size": None if args.shards else args.source_size,
        "threads_meaning": ("loader worker processes, 1 torch thread each" if args.backend == "cpu"
                            else "DALI CPU threads (num_threads) in this process"),
        "dali_version": _version("nvidia.dali"), "torch_version": torch.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "loadavg_start": list(load_before),
        "loadavg_end": list(os.getloadavg()), "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    crops = (f"2 x {args.image_size} + {args.local_crops} x {args.local_size} px crops" if args.task == "dino"
             else f"one {args.image_size} px view + caption tokens")
    print(f"{args.backend} loader, {args.task} ({crops}), {args.threads} thread(s), batch {args.batch}: "
          f"{report['images_per_s']:.1f} images/s, {report['images_per_s_per_thread']:.1f} per thread"
          + (f", {report['images_per_cpu_s']:.1f} per CPU second" if cpu else "")
          + f" (load average {load_before[0]:.2f} -> {report['loadavg_end'][0]:.2f})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"[bench] wrote {args.json}")
    return 0


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except ImportError:
        return None


def add_parser(commands) -> None:
    data = commands.add_parser("data", help="loader throughput (cpu or dali backend)", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("--backend", choices=("cpu", "dali"), required=True)
    data.add_argument("--task", choices=("clip", "dino"), required=True)
    data.add_argument("--threads", type=int, default=1, help="cpu: loader processes; dali: DALI CPU threads")
    data.add_argument("--batch", type=int, default=64)
    data.add_argument("--batches", type=int, default=20, help="timed batches")
    data.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    data.add_argument("--image-size", type=int, default=224, help="CLIP view / DINO global crop size")
    data.add_argument("--local-size", type=int, default=96)
    data.add_argument("--local-crops", type=int, default=10)
    data.add_argument("--shuffle-buffer", type=int, default=256)
    data.add_argument("--shards", default=None, help="read these shards instead of the synthetic world")
    data.add_argument("--samples", type=int, default=512, help="synthetic world size")
    data.add_argument("--source-size", type=int, default=320, help="synthetic image side (ImageNet-like ~ 300-500)")
    data.add_argument("--cache", default="data_cache/bench_data", help="where the synthetic world is kept")
    data.add_argument("--json", default=None, help="write the results as JSON here")
    data.set_defaults(func=cmd_data, check=check_data_args)


def check_data_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if min(args.threads, args.batch, args.batches) < 1 or args.warmup < 0:
        parser.error("--threads, --batch and --batches must be >= 1, --warmup >= 0")
    if args.backend == "dali":
        from data.dali import INSTALL_HINT, dali_available

        if not dali_available():
            parser.error(f"--backend dali needs NVIDIA DALI: {INSTALL_HINT}")

"""Benchmark of the evaluation harness: feature-extraction images/s and linear-probe wall time.

    python -m eval.bench --models tiny,base --out benchmarks/results/eval_cpu

For each model (tiny: the tiny configs' micro ViT/8 at 64 px; base: ViT-B/16 at 224 px; random weights, the
cost does not depend on them): images/s of the encoder forward alone (random tensors, median of repeats) and
of the whole pipeline on the synthetic world's val split (tar reading, JPEG decoding, bicubic resize + crop,
forward; `--workers` decoding processes), then the wall time of the linear probe ("small" preset, selection on
held-out train) on features of that width for the world's 4000 x 500 split sizes, and one optimizer step of
the paper protocol at ImageNet scale (batch 2048, 1000 classes, all 12 grid points at once) to extrapolate
the paper preset's cost. Writes OUT.json (every figure, the command, load averages) and OUT.txt (the table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from eval.data import open_eval_data
from eval.features import ExtractSettings, _run
from eval.linear_probe import PRESETS, ProbeBank, linear_probe
from models.vit import ViTConfig, VisionTransformer

MODELS = {"tiny": ViTConfig(size="micro", patch_size=8, image_size=64, pre_norm=True),
          "base": ViTConfig(size="base", patch_size=16, image_size=224, pre_norm=True)}


def _forward_rate(vit: VisionTransformer, size: int, batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        vit(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            vit(x)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"batch": batch, "repeats": repeats, "median_batch_s": median, "images_per_s": batch / median}


def _pipeline_rate(vit: VisionTransformer, data_dir: str, size: int, batch: int, workers: int, shards: int
                   ) -> dict[str, float]:
    data = open_eval_data(data_dir)
    data.splits["val"] = data.shards("val")[:shards]
    settings = ExtractSettings(size, batch_size=batch, workers=workers, progress=False)
    start = time.perf_counter()
    feats = _run(vit, "vit", data, "val", settings)
    seconds = time.perf_counter() - start
    return {"images": len(feats), "seconds": seconds, "images_per_s": len(feats) / seconds, "workers": workers,
            "batch": batch}


def _probe_time(dim: int, classes: int = 14, train: int = 4000, val: int = 500) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g)
    ytr, yva = torch.randint(0, classes, (train,), generator=g), torch.randint(0, classes, (val,), generator=g)
    xtr = centres[ytr] + 3 * torch.randn(train, dim, generator=g)
    xva = centres[yva] + 3 * torch.randn(val, dim, generator=g)
    start = time.perf_counter()
    result = linear_probe(xtr, ytr, xva, yva, classes, PRESETS["small"])
    return {"dim": dim, "train": train, "val": val, "classes": classes, "preset": "small",
            "seconds": time.perf_counter() - start, "top1": result["top1"]}


def _paper_step(dim: int, classes: int = 1000, batch: int = 2048, repeats: int = 3) -> dict[str, float]:
    """One AdamW step of all 12 grid points on a (batch, dim) minibatch; extrapolates the paper preset."""
    cfg = PRESETS["paper"]
    points = len(cfg.lrs) * len(cfg.weight_decays)
    bank = ProbeBank(dim, classes, points)
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-3)
    x, y = torch.randn(batch, dim), torch.randint(0, classes, (batch,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(bank(x).flatten(0, 1), y.repeat(points))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    grid_step = statistics.median(times[1:])
    steps_per_epoch = -(-1_281_167 // batch)  # ImageNet train
    # the final run trains one head: about 1/points of the grid step's matmul work
    estimate = steps_per_epoch * (cfg.grid_epochs * grid_step + cfg.epochs * grid_step / points)
    return {"dim": dim, "classes": classes, "batch": batch, "grid_points": points, "grid_step_s": grid_step,
            "imagenet_steps_per_epoch": steps_per_epoch, "paper_preset_estimate_s": estimate}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,base")
    p.add_argument("--data", default="data_cache/synthetic", help="synthetic world folder (val split is read)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write OUT.json and OUT.txt")
    args = p.parse_args(argv)
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        print(f"error: unknown --models {','.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if not (Path(args.data) / "world.json").is_file():
        print(f"error: {args.data} is not a synthetic world (python -m data.synthetic --out {args.data} ...)",
              file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    results: dict[str, Any] = {"command": " ".join(["python -m eval.bench", *(argv or sys.argv[1:])]),
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "load_before": load_before, "models": {}}
    for name in args.models.split(","):
        cfg = MODELS[name]
        torch.manual_seed(0)
        vit = VisionTransformer(cfg).eval()
        size = cfg.image_size
        batch = 64 if name == "tiny" else 16
        entry = {"config": asdict(vit.cfg), "params_m": sum(p.numel() for p in vit.parameters()) / 1e6,
                 "load_before": os.getloadavg(),
                 "forward": _forward_rate(vit, size, batch, args.repeats),
                 "pipeline": _pipeline_rate(vit, args.data, size, batch, args.workers, 2 if name == "tiny" else 1),
                 "probe_small": _probe_time(vit.width), "probe_paper_step": _paper_step(vit.width)}
        entry["load_after"] = os.getloadavg()
        results["models"][name] = entry
        print(_row(name, entry), flush=True)
    results["load_after"] = os.getloadavg()
    text = _table(results)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(results, indent=2))
        Path(f"{args.out}.txt").write_text(text + "\n")
    return 0


def _row(name: str, e: dict[str, Any]) -> str:
    paper = e["probe_paper_step"]
    return (f"| {name} ({e['params_m']:.1f}M, {e['config']['image_size']} px) | {e['forward']['images_per_s']:.1f} | "
            f"{e['pipeline']['images_per_s']:.1f} ({e['pipeline']['images']} imgs) | "
            f"{e['probe_small']['seconds']:.1f} s (D={e['probe_small']['dim']}) | "
            f"{paper['grid_step_s']:.2f} s -> ~{paper['paper_preset_estimate_s'] / 3600:.1f} h |")


def _table(r: dict[str, Any]) -> str:
    head = [f"eval harness on {r['machine']} ({r['cpus']} cpus, {r['threads']} torch threads), torch {r['torch']}",
            f"load average before {tuple(round(x, 2) for x in r['load_before'])}, after "
            f"{tuple(round(x, 2) for x in r['load_after'])}", f"command: {r['command']}", "",
            "| model | forward images/s | pipeline images/s (decode + transform + forward) | probe, small preset, "
            "4000/500 samples | paper preset: one 12-point grid step at batch 2048 x 1000 classes -> ImageNet "
            "estimate |", "|---|---|---|---|---|"]
    return "\n".join(head + [_row(n, e) for n, e in r["models"].items()])


if __name__ == "__main__":
    sys.exit(main())

"""Summarise the tiny CLIP init runs in this folder: python benchmarks/results/tiny_clip_init/summarize.py"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {"clip_e4": "schedule.epochs=4 (the demo)", "clip_scaled": "model.vision.init=scaled",
        "clip_e12": "schedule.epochs=12", "clip_s_e12": "model.vision.init=scaled schedule.epochs=12"}
for run, overrides in RUNS.items():
    rows = [json.loads(line) for line in open(HERE / run / "metrics.jsonl")]
    losses = [r["loss"] for r in rows]
    first = next((i + 10 for i in range(len(losses) - 9) if sum(losses[i:i + 10]) / 10 < 4.10), None)
    s = json.load(open(HERE / run / "results.json"))["summary"]
    print(f"{run:12s} {overrides:45s} steps {len(rows):4d}  first step where the 10-step mean loss < 4.10: {first}  "
          f"final loss {losses[-1]:.3f}  colour probe {s['embedding/factor_probe/color']:.1f}%  "
          f"shape probe {s['embedding/factor_probe/shape']:.1f}%")

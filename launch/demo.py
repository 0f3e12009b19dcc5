#!/usr/bin/env python
"""The embedded default (`make demo`): a tiny CLIP and a tiny DINO pretrained under identical conditions.

Same micro ViT backbone, same synthetic webdataset shards (generated on first use), same samples
seen and global batch; only the objective (and its own optimizer recipe) differs. CPU, minutes.

    python launch/demo.py [--steps N] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from train.plots import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs" / "pretrain"


def run_objective(name: str, out: Path, steps: int | None) -> Path:
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always starts fresh
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(CONFIGS / f"tiny_{name}.yaml"),
           f"run.dir={run_dir}"] + ([f"schedule.steps={steps}"] if steps else [])
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return run_dir


def comparison_plot(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6))
    for ax, (name, run_dir) in zip(axes, runs.items()):
        rows = read_jsonl(run_dir / "metrics.jsonl")
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
        ax.set_title(f"tiny {name}: loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where the two runs go")
    parser.add_argument("--steps", type=int, default=None, help="override the configs' schedule (for a quick look)")
    args = parser.parse_args(argv)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        runs = {name: run_objective(name, out, args.steps) for name in ("clip", "dino")}
    except subprocess.CalledProcessError as e:
        print(f"demo: `{' '.join(map(str, e.cmd[1:]))}` failed with exit code {e.returncode} (see above)", file=sys.stderr)
        return 1
    subprocess.run([sys.executable, str(ROOT / "launch" / "diff_configs.py"), str(runs["clip"]), str(runs["dino"])],
                   cwd=ROOT, check=True)
    comparison_plot(runs, out / "comparison.png")
    print(f"\nDemo finished in {time.time() - start:.0f} s. Where things are:")
    for name, run_dir in runs.items():
        last = read_jsonl(run_dir / "metrics.jsonl")[-1]
        exports = sorted((run_dir / "export").iterdir())
        print(f"  {name:5s} {run_dir}  final loss {last['loss']:.3f}, {last['samples_per_s']:.0f} samples/s")
        print(f"        metrics {run_dir / 'metrics.jsonl'}, plot {run_dir / 'loss.png'}, encoder {exports[-1]}")
    print(f"  both  {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

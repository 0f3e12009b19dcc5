#!/usr/bin/env python
"""Train the embedded default's encoders over several seeds, probe every factor, report mean +- std.

For each seed and objective: `launch/pretrain.py --config launch/configs/pretrain/tiny_<objective>.yaml seed=S`,
then `launch/eval.py --tasks linear_probe,embedding` on the final export (the linear probe on shape, and a linear
probe per factor of the synthetic world). Beside them, two baselines that need no pretraining, on the same
world: a linear probe on raw pixels and on the micro ViT at its random init (benchmarks/synthetic_difficulty.py).

    python benchmarks/demo_seeds.py --seeds 0,1,2 --out runs/demo_seeds \\
        --results benchmarks/results/demo_seeds_cpu   # writes .md, .json and .png

Finished runs are kept (a rerun only trains what is missing; --fresh starts over). `--set` / `--set-clip` /
`--set-dino` add config overrides (dotted keys), for sweeps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval.factors import FACTOR_NAMES  # noqa: E402


def _run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise SystemExit(f"`{' '.join(cmd[1:])}` failed ({proc.returncode}); see {log}")
    return time.time() - start


def train_and_probe(objective: str, seed: int, out: Path, overrides: list[str], fresh: bool) -> dict:
    run_dir = out / f"{objective}_s{seed}"
    record = run_dir / "probe_record.json"
    if record.is_file() and not fresh:
        return json.loads(record.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    config = ROOT / "launch" / "configs" / "pretrain" / f"tiny_{objective}.yaml"
    cmd = [sys.executable, "launch/pretrain.py", "--config", str(config), f"run.dir={run_dir}", f"seed={seed}",
           "logging.progress=false", "logging.wandb=disabled", *overrides]
    print(f"  train {objective} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    wall = _run(cmd, run_dir.parent / f"{run_dir.name}.train.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    export = sorted((run_dir / "export").iterdir())[-1]
    cfg = json.loads((export / "config.json").read_text())
    data = str(Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train"]).parent)
    eval_out = run_dir / "eval"
    cmd = [sys.executable, "launch/eval.py", "--checkpoint", str(export), "--data", data, "--out", str(eval_out),
           "--tasks", "linear_probe,embedding", "--no-progress", "--seed", str(seed)]
    eval_wall = _run(cmd, run_dir.parent / f"{run_dir.name}.eval.log")
    summary = json.loads((eval_out / "results.json").read_text())["summary"]
    result = {"objective": objective, "seed": seed, "steps": rows[-1]["step"], "samples_seen": rows[-1]["samples_seen"],
              "train_wall_s": wall, "train_step_s": sum(r["step_time_s"] for r in rows), "eval_wall_s": eval_wall,
              "final_loss": rows[-1]["loss"], "overrides": overrides, "export": str(export), "data": data,
              "shape_linear_probe": summary.get("linear_probe/top1"),
              "factor_probe": {f: summary.get(f"embedding/factor_probe/{f}") for f in FACTOR_NAMES},
              "vision": cfg.get("vision", {})}
    record.write_text(json.dumps(result, indent=2))
    return result


def baselines(data: str, patch_size: int, init: str) -> dict:
    """Pixel and random-init ViT probes per factor, plus each factor's chance (majority-class rate of val)."""
    from synthetic_difficulty import fit_linear, load_split, random_init_features
    import torch.nn.functional as F

    from eval.data import open_eval_data

    world = open_eval_data(data, label="shape")
    tx, tf = load_split(world, "train")
    vx, vf = load_split(world, "val")
    px_t, px_v = (F.interpolate(x.float(), size=32, mode="area").flatten(1) for x in (tx, vx))
    it, iv = (random_init_features(x, init, patch_size) for x in (tx, vx))
    out = {}
    for i, name in enumerate(FACTOR_NAMES):
        classes = int(max(tf[:, i].max(), vf[:, i].max())) + 1
        out[name] = {"chance": 100 * torch.bincount(vf[:, i], minlength=classes).max().item() / len(vf),
                     "pixel": 100 * (fit_linear(px_t, tf[:, i], px_v, classes) == vf[:, i]).float().mean().item(),
                     "init_vit": 100 * (fit_linear(it, tf[:, i], iv, classes) == vf[:, i]).float().mean().item()}
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_report(results: list[dict], base: dict, path: Path, argv: list[str]) -> None:
    objectives = sorted({r["objective"] for r in results}, key=lambda o: ("clip", "dino").index(o)
                        if o in ("clip", "dino") else 9)
    seeds = sorted({r["seed"] for r in results})
    lines = [f"# Embedded default: probes per factor over seeds {', '.join(map(str, seeds))}", "",
             f"`python benchmarks/demo_seeds.py {' '.join(argv)}`  ", f"{platform.node()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             "Linear probe top-1 (%) on the val split, mean ± std over seeds; chance = majority-class rate; "
             "pixel = linear probe on raw 32 px pixels; init ViT = linear probe on the micro ViT at random init.", "",
             "| factor | chance | pixel | init ViT | " + " | ".join(objectives) + " |",
             "|---|---|---|---|" + "---|" * len(objectives)]
    stats = {}
    for f in FACTOR_NAMES:
        cells = []
        for o in objectives:
            m, s = _mean_std([r["factor_probe"][f] for r in results if r["objective"] == o])
            stats.setdefault(o, {})[f] = (m, s)
            cells.append(f"{m:.1f} ± {s:.1f}")
        lines.append(f"| {f} | {base[f]['chance']:.1f} | {base[f]['pixel']:.1f} | {base[f]['init_vit']:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| objective | shape probe (full protocol) | shape / chance | steps | samples seen | "
              "train wall (s) | sum of step times (s) | final loss |", "|---|---|---|---|---|---|---|---|"]
    for o in objectives:
        rs = [r for r in results if r["objective"] == o]
        m, s = _mean_std([r["shape_linear_probe"] for r in rs])
        w, ws = _mean_std([r["train_wall_s"] for r in rs])
        t, ts = _mean_std([r["train_step_s"] for r in rs])
        lines.append(f"| {o} | {m:.1f} ± {s:.1f} | {m / base['shape']['chance']:.2f}x | {rs[0]['steps']} | "
                     f"{rs[0]['samples_seen']} | {w:.0f} ± {ws:.0f} | {t:.0f} ± {ts:.0f} | "
                     f"{statistics.fmean(r['final_loss'] for r in rs):.3f} |")
    overrides = sorted({" ".join(r["overrides"]) for r in results})
    lines += ["", f"Overrides: {overrides if any(overrides) else 'none'}", ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"runs": results, "baselines": base, "argv": argv}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / (2 + len(objectives))
    xs = range(len(FACTOR_NAMES))
    series = [("pixel", [base[f]["pixel"] for f in FACTOR_NAMES], None, "#bbbbbb"),
              ("init ViT", [base[f]["init_vit"] for f in FACTOR_NAMES], None, "#888888")]
    series += [(o, [stats[o][f][0] for f in FACTOR_NAMES], [stats[o][f][1] for f in FACTOR_NAMES], None)
               for o in objectives]
    for k, (label, values, err, color) in enumerate(series):
        ax.bar([x + (k - len(series) / 2 + 0.5) * width for x in xs], values, width, yerr=err, label=label,
               color=color, capsize=2)
    ax.scatter([x for x in xs], [base[f]["chance"] for f in FACTOR_NAMES], marker="_", s=400, color="k",
               label="chance", zorder=3)
    ax.set_xticks(list(xs), FACTOR_NAMES)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"embedded default: linear probe per factor (mean ± std over {len(seeds)} seeds)")
    ax.legend(fontsize=7, ncol=6)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--objectives", default="clip,dino")
    p.add_argument("--out", default="runs/demo_seeds", help="run folders")
    p.add_argument("--results", required=True, help="report path without suffix (.md, .json, .png are written)")
    p.add_argument("--set", action="append", default=[], help="override for every objective (repeatable)")
    p.add_argument("--set-clip", action="append", default=[], help="override for clip only")
    p.add_argument("--set-dino", action="append", default=[], help="override for dino only")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have a record")
    args = p.parse_args(argv)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for objective in args.objectives.split(","):
            extra = args.set + (args.set_clip if objective == "clip" else args.set_dino if objective == "dino" else [])
            r = train_and_probe(objective, seed, out, extra, args.fresh)
            print(f"  {objective} seed {seed}: shape {r['shape_linear_probe']:.1f}%, factors "
                  + ", ".join(f"{f} {v:.1f}" for f, v in r["factor_probe"].items())
                  + f" (train {r['train_wall_s']:.0f} s)", flush=True)
            results.append(r)
    vision = results[0]["vision"]
    base = baselines(results[0]["data"], int(vision.get("patch_size", 8)), "scaled")
    results_path = (ROOT / args.results) if not Path(args.results).is_absolute() else Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    write_report(results, base, results_path, argv)
    print(results_path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The VLM stage's embedded default on CPU, per encoder: stage 1 + stage 2 (SmolLM2-135M-Instruct, the synthetic
instruction data) and the synthetic VMCBench, timed. Writes a markdown table and the runs' results.

    python benchmarks/vlm_embedded_default.py --encoder clip=runs/demo/pretrain/clip_s0/export/step_0000300 \
        --encoder dino=runs/demo/pretrain/dino_s0/export/step_0000300 --out runs/vlm_demo \
        --table benchmarks/results/vlm_embedded_default_cpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"})
    if done.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {done.returncode}); log: {log}")
    return time.time() - start


def newest_export(run_dir: Path) -> Path:
    return sorted((run_dir / "export").glob("step_*"))[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", action="append", required=True, help="NAME=EXPORT_DIR (repeat)")
    parser.add_argument("--out", default="runs/vlm_demo")
    parser.add_argument("--table", default="")
    parser.add_argument("--split", default="dev")
    parser.add_argument("overrides", nargs="*", help="extra key=value for both stages")
    args = parser.parse_args(argv)
    out = Path(args.out)
    py = sys.executable
    rows = []
    for spec in args.encoder:
        name, export = spec.split("=", 1)
        base = out / name
        base.mkdir(parents=True, exist_ok=True)
        common = [f"model.vision={export}", "logging.progress=false", *args.overrides]
        t1 = run([py, "launch/train_vlm.py", "--config", "launch/configs/vlm/tiny_stage1.yaml",
                  f"run.dir={base / 'stage1'}", *common], base / "stage1.log")
        t2 = run([py, "launch/train_vlm.py", "--config", "launch/configs/vlm/tiny_stage2.yaml",
                  f"run.dir={base / 'stage2'}", f"model.projector_from={base / 'stage1'}", *common], base / "stage2.log")
        t3 = run([py, "launch/eval_vmcbench.py", "--model", str(newest_export(base / "stage2")), "--data",
                  "data_cache/vlm/vmcbench", "--out", str(base / "vmcbench"), "--split", args.split, "--no-progress"],
                 base / "vmcbench.log")
        result = json.loads((base / "vmcbench" / "results.json").read_text())
        losses = [json.loads(line)["loss"] for line in (base / "stage2" / "metrics.jsonl").read_text().splitlines()]
        rows.append((name, t1, t2, t3, losses[0], losses[-1], result))
        print(f"{name}: stage 1 {t1:.0f} s, stage 2 {t2:.0f} s, VMCBench {t3:.0f} s, overall {result['overall']:.1f}%",
              flush=True)
    groups = ("General", "Reasoning", "OCR", "Doc&Chart")
    lines = [f"# VLM embedded default on CPU ({platform.node()}, {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f})", "",
             f"`python benchmarks/vlm_embedded_default.py {' '.join(argv or sys.argv[1:])}`", "",
             "| encoder | stage 1 s | stage 2 s | VMCBench s | stage-2 loss first -> last | overall | "
             + " | ".join(f"{g} micro / macro" for g in groups) + " | unparsed |",
             "|---|---|---|---|---|---|" + "---|" * len(groups) + "---|"]
    for name, t1, t2, t3, first, last, r in rows:
        cells = " | ".join(f"{_pct(r['groups']['micro'].get(g))} / {_pct(r['groups']['macro'].get(g))}" for g in groups)
        lines.append(f"| {name} | {t1:.0f} | {t2:.0f} | {t3:.0f} | {first:.3f} -> {last:.3f} | {r['overall']:.1f} | "
                     f"{cells} | {r['unparsed']}/{r['n']} |")
    lines += ["", "Per category (%):", "", "| encoder | " + " | ".join(sorted(rows[0][6]["categories"])) + " |",
              "|---|" + "---|" * len(rows[0][6]["categories"])]
    for name, *_, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r['categories'][c]:.1f}" for c in sorted(r["categories"])) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    return 0


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())

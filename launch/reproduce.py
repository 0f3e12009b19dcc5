#!/usr/bin/env python
"""The whole study in one command: pretrain every variant under one budget, probe and compare the encoders,
build a LLaVA-1.5 VLM on each, score it on VMCBench, and write OUT/report/report.md with its figures.

    python launch/reproduce.py --preset tiny                       # make demo: CLIP and DINO on CPU, ~15 min
    python launch/reproduce.py --preset tiny --variants clip,siglip,dino,clip_frozen_text,hybrid --seeds 3
    DATACOMP_DIR=... IMAGENET_SHARDS=... VICUNA_DIR=... LLAVA_DATA=... VMCBENCH_DIR=... \\
        python launch/reproduce.py --preset paper --out /ckpt/study  # 8 GPUs per training stage (--launcher)
    RELEASED_CLIP=/models/clip-vit-b-16-datacomp-10m RELEASED_DINO=/models/dino-vit-b-16-datacomp-10m ... \\
        python launch/reproduce.py --preset released --out /ckpt/released
    python launch/reproduce.py --preset paper --dry-run            # the stages, their commands and estimates

A rerun of the same command skips finished stages and continues an interrupted one from its checkpoint; a failed
stage is reported with its log and the other variants go on (exit 1 at the end). `--set KEY=VALUE` changes the
preset (dotted keys of launch/configs/study/<preset>.yaml). docs/reproduce.md has the presets and the layout.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from _bootstrap import OneLineParser  # noqa: F401  (and the repo root first on sys.path)

import study_plan  # noqa: E402
from study_plan import ROOT, TRAINING_KINDS, PlanError, load_preset, make_plan  # noqa: E402
from study_runner import Interrupted, StudyRunner, fmt_s, print_summary  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="launch/reproduce.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | paper | released, or a preset YAML (default: tiny)")
    p.add_argument("--out", help="study folder (default: runs/study_<preset>)")
    p.add_argument("--variants", help="comma-separated, from clip,siglip,dino,clip_frozen_text,hybrid "
                                      "(default: the preset's)")
    p.add_argument("--seeds", type=int, help="pretraining seeds per variant (default: the preset's)")
    p.add_argument("--launcher", help="prefix of the training stages, e.g. 'deepspeed --num_gpus 8' "
                                      "(default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a preset key (repeat)")
    p.add_argument("--dry-run", action="store_true", help="print the stages and commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from what exists")
    p.add_argument("--poll", type=float, default=None, help="seconds between progress lines (default: 30; 5 on a "
                                                              "terminal)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sets = list(args.set) + ([f"launcher={args.launcher}"] if args.launcher else [])
        preset = load_preset(args.preset, sets)
        variants = args.variants.split(",") if args.variants else None
        stages = make_plan(preset, variants, args.seeds, strict_paths=not args.dry_run)
    except (PlanError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/study_{preset['name']}")
    out = out if out.is_absolute() else ROOT / out
    if args.dry_run:
        study_plan.DRY_RUN = True
        return _print_plan(stages, out, preset)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.json").write_text(json.dumps({k: v for k, v in preset.items()}, indent=1, default=str))
    start = time.time()
    status: dict[str, str] = {}
    interrupted = None
    runner = StudyRunner(stages, out, poll_s=args.poll or (5.0 if sys.stdout.isatty() else 30.0),
                         log=lambda m: print(m, flush=True))
    if not args.report_only:
        try:
            status = runner.run()
        except Interrupted as e:
            interrupted = str(e)
        except KeyboardInterrupt:
            interrupted = "SIGINT"
    _write_study(out, preset, stages, runner, start)
    report = _report(out, preset)
    if not args.report_only:
        print_summary(runner, out)
    print(f"\nstudy: {fmt_s(time.time() - start)}; report {report or '(not written)'}", flush=True)
    if interrupted:
        print(f"interrupted ({interrupted}): rerun the same command to continue", file=sys.stderr)
        return 130
    bad = [name for name, s in status.items() if s in ("failed", "blocked")]
    if bad:
        print(f"error: {len(bad)} stage(s) failed or blocked: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _print_plan(stages, out: Path, preset: dict) -> int:
    total = sum(s.estimate_s for s in stages)
    gpus = int(preset.get("gpus") or 0)
    gpu_hours = sum(s.estimate_s * (gpus if s.kind in TRAINING_KINDS else 1) for s in stages) / 3600 if gpus else 0
    print(f"preset {preset['name']}: {len(stages)} stages, estimated {fmt_s(total)} one after another"
          + (f", {gpu_hours:,.0f} GPU-hours ({gpus} GPUs per training stage, 1 per eval)" if gpus else "")
          + " (the preset's estimates_s: where they come from is written there)")
    for i, stage in enumerate(stages):
        try:
            cmd = shlex.join(stage.command(out))
        except FileNotFoundError:
            cmd = "(built when its inputs exist)"
        deps = f" after {', '.join(stage.deps)}" if stage.deps else ""
        print(f"[{i + 1}/{len(stages)}] {stage.name} (~{fmt_s(stage.estimate_s)}){deps}\n    {cmd}")
    return 0


def _write_study(out: Path, preset: dict, stages, runner: StudyRunner, start: float) -> None:
    """OUT/study.json: every stage's latest record (from its folder when this invocation did not touch it)."""
    from study_runner import read_record

    rows = []
    for stage in stages:
        rec = runner.records.get(stage.name) or read_record(stage, out) or {"status": "not run"}
        if runner.status.get(stage.name) == "skipped":
            rec = {**rec, "status": "done"}
        rows.append({"name": stage.name, "kind": stage.kind, "variant": stage.variant, "seed": stage.seed,
                     **{k: v for k, v in rec.items() if k not in ("name", "kind", "variant", "seed")}})
    (out / "study.json").write_text(json.dumps({"preset": preset["name"], "stages": rows,
                                                "last_run_s": time.time() - start}, indent=1, default=str))


def _report(out: Path, preset: dict) -> Optional[Path]:
    try:
        from eval.study_report import write_report

        return write_report(out, preset, notes=preset.get("notes", ""))
    except Exception as e:  # the report must not hide the stages' outcome
        if os.environ.get("CLIPDINO_DEBUG"):
            raise
        print(f"report failed: {type(e).__name__}: {e} (CLIPDINO_DEBUG=1 for the traceback)", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())

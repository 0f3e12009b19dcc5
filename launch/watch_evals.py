#!/usr/bin/env python
"""Evaluate each new complete export of a run folder exactly once; keep evals.jsonl / evals.md / evals.png.

    python launch/watch_evals.py runs/tiny_clip                          # poll until interrupted
    python launch/watch_evals.py runs/tiny_clip --once --tasks linear_probe,knn
    python launch/watch_evals.py runs/vitb16_clip --data /data/imagenet_shards -- --probe-preset paper --device cuda
    python launch/watch_evals.py runs/vlm_stage2 --once -- --limit 200       # a VLM run: VMCBench per export

Arguments after `--` go to every `launch/eval.py` call. Data defaults to the run's eval.data, else the
synthetic world beside data.train (read from RUN_DIR/config.yaml). A VLM run (config.yaml sets model.llm)
exports Hugging Face LLaVA folders: each is scored on VMCBench (`launch/eval_vmcbench.py`, data = eval.data,
split / limit / max_new_tokens / batch_size from the run's eval section; `--` arguments go to that script;
docs/vlm.md). Training starts this itself with `eval.watch=true`. A failed evaluation is recorded (evals.md
lists it, the log is in evals/step_N/eval.log) and the watcher goes on. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from _bootstrap import OneLineParser  # (and the repo root on sys.path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = OneLineParser(prog="launch/watch_evals.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (its export/step_NNNNNNN/ folders are evaluated)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the run's eval.tasks, else all)")
    p.add_argument("--data", help="evaluation data folder (default: from the run's config)")
    p.add_argument("--once", action="store_true", help="evaluate what is there now, then exit")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between polls")
    p.add_argument("--follow-pid", type=int, help="drain and exit when this process (the trainer) is gone")
    p.add_argument("--stop-file", help="drain and exit once this file exists (the trainer creates it at the end)")
    p.add_argument("--eval-timeout", type=float, help="seconds before an evaluation is killed and recorded failed")
    p.add_argument("--retry-failed", action="store_true", help="evaluate exports whose earlier evaluation failed")
    args = p.parse_args(argv)

    from eval.context import DEFAULT_TASKS
    from eval.tasks import parse_tasks
    from eval.watcher import ENCODER, VLM, Watcher, WatcherBusy, complete_exports, default_eval_data, vlm_eval_args

    run_dir = Path(args.run_dir)
    try:
        if not run_dir.is_dir():
            raise ValueError(f"run folder {run_dir} does not exist")
        run_eval, run_data, run_model = _run_config(run_dir)
        kind = VLM if run_model.get("llm") else ENCODER
        if kind == VLM:  # scored on VMCBench, not on the encoder tasks
            if args.tasks not in (None, "vmcbench"):
                raise ValueError(f"--tasks {args.tasks}: {run_dir} is a VLM run (model.llm), scored on VMCBench only")
            tasks, data = "vmcbench", args.data or run_eval.get("data")
            if not data or not Path(data).exists():
                raise ValueError(f"VMCBench data {data!r} not found: set eval.data in the run config or pass --data")
            extra = vlm_eval_args(run_eval) + extra  # later arguments win: `--` overrides the run's eval section
        else:
            tasks = args.tasks or run_eval.get("tasks") or ",".join(DEFAULT_TASKS)
            parse_tasks(tasks)  # unknown names fail here, with a suggestion
            data = args.data or default_eval_data(run_dir, run_eval.get("data") or "", run_data.get("train") or "")
            if not Path(data).is_dir():
                raise ValueError(f"evaluation data folder {data} does not exist")
        if args.once and not complete_exports(run_dir, kind=kind):
            raise ValueError(f"no complete exports in {run_dir / 'export'}")
        watcher = Watcher(run_dir, tasks, data, args.interval, extra, args.eval_timeout, args.retry_failed, kind=kind)
        count = watcher.run(once=args.once, follow_pid=args.follow_pid, stop_file=args.stop_file)
    except (ValueError, WatcherBusy, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"[watch] {count} export(s) evaluated; see {run_dir / 'evals.md'}", flush=True)
    return 0


def _run_config(run_dir: Path) -> tuple[dict, dict, dict]:
    """The `eval`, `data` and `model` sections of RUN_DIR/config.yaml ({} where absent); a bad file is a ValueError."""
    if not (run_dir / "config.yaml").is_file():
        return {}, {}, {}
    from train.config_loader import read_yaml_with_extends

    cfg = read_yaml_with_extends(run_dir / "config.yaml")  # ConfigError (a ValueError): one line, file named
    sections = []
    for name in ("eval", "data", "model"):
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{run_dir / 'config.yaml'}: `{name}` is not a section")
        sections.append(section)
    return sections[0], sections[1], sections[2]


if __name__ == "__main__":
    sys.exit(main())

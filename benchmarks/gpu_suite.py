#!/usr/bin/env python
"""The GPU suite: every GPU figure the docs still lack, in one call of at most 8 minutes (docs/gpu_suite.md).

    python benchmarks/gpu_suite.py [--out DIR] [--budget S] [--only PART,...]     (one GPU)
    python benchmarks/gpu_suite.py --cpu --tiny --out DIR                          (every step, tiny, on the CPU)

Usually started by benchmarks/gpu_suite.sh, which first installs the wheelhouse offline. Each part runs
`launch/bench.py train|loss` as subprocesses (own process group, JSON out) within a time limit; a part that fails
or runs past its limit is a row saying so and the others still run. Parts, in order (time slices on one GPU, 480 s):

  env                 30 s  device, versions; deepspeed, open_clip, timm, webdataset, triton must import
  train_clip          60 s  ViT-B/16 CLIP bf16, ours vs open_clip, eager; --batch auto (largest that fits)
  train_dino          45 s  ViT-B/16 DINO bf16 (2x224 + 10x96 px crops, K 65536), eager; --batch auto
  loss_clip           50 s  fused Triton vs torch CLIP loss, batch 16384 and 65536, dim 512, bf16
  loss_dino           35 s  fused Triton vs torch DINO loss, batch 1024, K 65536, 2 + 10 crops, bf16
  train_clip_compile 140 s  as train_clip, + every side compiled, at train_clip's batch
  train_dino_compile  75 s  as train_dino, + compiled, at train_dino's batch
  loss_siglip         45 s  fused Triton vs torch SigLIP loss, as loss_clip

A part may run past its slice by what the parts before it left unused: its limit is the budget left minus the
slices of the parts after it. Nothing here changes device settings (clocks, power, persistence): nvidia-smi is
only queried. Writes OUT/gpu_suite_<UTC stamp>[_cpu_tiny].json (every figure, raw reports, commands, statuses,
log tails) and .md (the tables); exit code 1 when a part is not ok. With --cpu --tiny the figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "launch" / "bench.py"
sys.path.insert(0, str(BENCH.parent))
from bench_all import stop_group  # noqa: E402  (SIGTERM to a command's process group, SIGKILL 5 s later)
REQUIRED = ("deepspeed", "open_clip", "timm", "webdataset", "triton")
VERSIONS = ("torch", "triton", "deepspeed", "open_clip_torch", "timm", "webdataset", "transformers", "numpy",
            "pydantic")
WHAT = {"env": "device, versions; the carried packages import",
        "train": "one train step (forward, backward, clip, AdamW; DINO + EMA teacher), median of the timed steps",
        "loss": "loss forward + backward: time (best of the repeats) and peak tensor memory, fused vs torch"}


@dataclass
class Part:
    name: str
    kind: str  # env | train | loss
    slice_s: float
    commands: Callable[["Part", Path, dict], list[tuple[str, list[str], Optional[Path]]]]
    options: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the plan
def plan(tiny: bool, cpu: bool) -> list[Part]:
    device = "cpu" if cpu else "cuda"
    train = ({"model": "vit_micro", "warmup": 1, "steps": 2} if tiny else {"model": "vit_b16", "warmup": 3, "steps": 8})
    clip = {**train, "objective": "clip", "candidates": "32,16,8" if tiny else "1536,1024,768,512,384,256,128,64",
            "vs": "open_clip"}
    dino = {**train, "objective": "dino", "candidates": "16,8" if tiny else "512,384,256,192,128,64,32",
            "local_crops": 2 if tiny else 10}
    pairwise = ({"batch": [64, 128], "dim": 32, "dtype": "fp32", "repeat": 1, "tiles": [16, 16, 32, 32]} if tiny
                else {"batch": [16384, 65536], "dim": 512, "dtype": "bf16", "repeat": 5})
    dino_loss = ({"batch": [8], "k": 256, "local_crops": 2, "dtype": "fp32", "repeat": 1} if tiny
                 else {"batch": [1024], "k": 65536, "local_crops": 10, "dtype": "bf16", "repeat": 5})
    s = (lambda gpu: 240.0) if cpu else (lambda gpu: float(gpu))  # noqa: E731  (CPU: generous, figures mean nothing)
    return [Part("env", "env", s(30), env_commands, {"device": device}),
            Part("train_clip", "train", s(60), train_commands, {**clip, "device": device}),
            Part("train_dino", "train", s(45), train_commands, {**dino, "device": device}),
            Part("loss_clip", "loss", s(50), loss_commands, {"loss": "clip", **pairwise, "device": device}),
            Part("loss_dino", "loss", s(35), loss_commands, {"loss": "dino", **dino_loss, "device": device}),
            Part("train_clip_compile", "train", s(140), train_commands,
                 {**clip, "device": device, "compile": True, "batch_from": "train_clip"}),
            Part("train_dino_compile", "train", s(75), train_commands,
                 {**dino, "device": device, "compile": True, "batch_from": "train_dino"}),
            Part("loss_siglip", "loss", s(45), loss_commands, {"loss": "siglip", **pairwise, "device": device})]


def env_commands(part: Part, scratch: Path, done: dict) -> list:
    report = scratch / "env.json"
    return [("main", [sys.executable, str(Path(__file__).resolve()), "--env-probe", part.options["device"],
                      str(report)], report)]


def train_commands(part: Part, scratch: Path, done: dict) -> list:
    o = part.options
    batch = "auto"
    source = done.get(o.get("batch_from", ""), {}).get("reports", {}).get("main")
    if source and isinstance(source.get("batch"), int):
        batch = str(source["batch"])  # the eager part's search result: the compiled sides run at the same batch
    report = scratch / f"{part.name}.json"
    argv = [sys.executable, str(BENCH), "train", "--model", o["model"], "--objective", o["objective"],
            "--batch", batch, "--batch-candidates", o["candidates"], "--warmup", str(o["warmup"]),
            "--steps", str(o["steps"]), "--device", o["device"], "--json", str(report)]
    argv += ["--vs", o["vs"]] if o.get("vs") else []
    argv += ["--local-crops", str(o["local_crops"])] if "local_crops" in o else []
    argv += ["--compile"] if o.get("compile") else []
    return [("main", argv, report)]


def loss_commands(part: Part, scratch: Path, done: dict) -> list:
    o = part.options
    common = ["--loss", o["loss"], "--batch", *map(str, o["batch"]), "--dtype", o["dtype"], "--repeat",
              str(o["repeat"]), "--device", o["device"]]
    common += ["--k", str(o["k"]), "--local-crops", str(o["local_crops"])] if o["loss"] == "dino" else \
        ["--dim", str(o["dim"])]
    common += ["--tiles", *map(str, o["tiles"])] if o.get("tiles") else []
    out = []
    for role, impl in (("fused", "triton"), ("torch", "torch")):
        report = scratch / f"{part.name}.{role}.json"
        out.append((role, [sys.executable, str(BENCH), "loss", *common, "--impl", impl, "--json", str(report)], report))
    return out


# ----------------------------------------------------------------------------- running
def tail(path: Path, lines: int = 25) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_command(argv: list[str], log: Path, limit_s: float, env: dict) -> tuple[str, float, Optional[str]]:
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit_s, 0.1))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return "timed out", time.monotonic() - start, None
        except BaseException:
            stop_group(proc)
            raise
    last = next((line for line in reversed(tail(log)) if line.strip()), "no output")
    return ("ok", time.monotonic() - start, None) if code == 0 else \
        ("failed", time.monotonic() - start, f"exit code {code}: {last[-300:]}")


def run_part(part: Part, scratch: Path, done: dict, limit_s: float, env: dict) -> dict[str, Any]:
    started, record = time.monotonic(), {"name": part.name, "kind": part.kind, "slice_s": part.slice_s,
                                         "limit_s": round(limit_s, 1), "commands": {}, "reports": {}, "logs": {},
                                         "status": "ok", "error": None}
    for role, argv, report in part.commands(part, scratch, done):
        record["commands"][role] = shlex.join(argv)
        left = limit_s - (time.monotonic() - started)
        log = scratch / f"{part.name}.{role}.log"
        status, seconds, error = run_command(argv, log, left, env) if left > 1 else ("timed out", 0.0, None)
        record["logs"][role] = tail(log)
        if status == "ok" and report is not None:
            if report.is_file():
                record["reports"][role] = json.loads(report.read_text())
            else:
                status, error = "failed", f"exit code 0 but no JSON at {report}"
        if status != "ok":
            record["status"] = status
            record["error"] = f"{role}: " + (error or f"killed at the part's limit of {limit_s:.0f} s")
            break
    record["seconds"] = round(time.monotonic() - started, 1)
    check_figures(record)
    return record


def check_figures(record: dict[str, Any]) -> None:
    """An ok part must hold its figures: env every required module; loss every batch of both impls."""
    if record["status"] != "ok":
        return
    reports = record["reports"]
    if record["kind"] == "env":
        missing = [m for m in REQUIRED if reports["main"]["imports"].get(m, {}).get("error")]
        if missing:
            record["status"], record["error"] = "failed", "cannot import " + ", ".join(missing)
    elif record["kind"] == "loss":
        bad = [f"{role} batch {x['batch']}: {x.get('failed') or x.get('skipped')}" for role, r in reports.items()
               for x in r["results"] if "peak_alloc_bytes" not in x]
        if bad:
            record["status"], record["error"] = "partial", "; ".join(bad)[:600]


# ----------------------------------------------------------------------------- the env probe (a child process)
def env_probe(device: str, path: str) -> int:
    import importlib
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable, "imports": {},
                           "versions": {}, "host": platform.node(), "cores": os.cpu_count()}
    for name in VERSIONS:
        with contextlib.suppress(md.PackageNotFoundError):
            out["versions"][name] = md.version(name)
    for module in ("torch", *REQUIRED):
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(module)
            out["imports"][module] = {"seconds": round(time.perf_counter() - t0, 2), "file": getattr(mod, "__file__", None)}
        except Exception as e:  # noqa: BLE001  (recorded: the part fails on it)
            out["imports"][module] = {"error": f"{type(e).__name__}: {e}"[:300]}
    with contextlib.suppress(Exception):
        from deepspeed.accelerator import get_accelerator
        out["deepspeed_accelerator"] = get_accelerator()._name
    import torch

    out["torch_cuda"] = torch.version.cuda
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "sms": props.multi_processor_count,
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
        query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,persistence_mode"
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only query: nothing is set
            out["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                               capture_output=True, text=True, timeout=20).stdout.strip()
    else:
        out["cpu"] = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), platform.machine())
    Path(path).write_text(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------- output
def gib(b: Optional[float]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def secs(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def train_rows(record: dict) -> list[list[str]]:
    r = record["reports"].get("main")
    if not r:
        return []
    rows = []
    search = "; ".join(f"{t['batch']}: {t['result']}" for t in r.get("batch_search") or [])
    for name, s in r["sides"].items():
        base = name.replace("+compile", "")
        vs_eager = r["ratios"].get(f"{name} / {base}") if name != base else None
        ref = "open_clip" + ("+compile" if name.endswith("+compile") else "")
        vs_ref = r["ratios"].get(f"{name} / {ref}")
        rows.append([record["name"], name, str(r["batch"]), secs(s["step_time_median_s"]), f"{s['samples_per_s']:.1f}",
                     "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%", gib(s["peak_mem_bytes"]),
                     secs(s["first_step_s"]), "-" if vs_ref is None else f"{vs_ref:.2f}x",
                     "-" if vs_eager is None else f"{vs_eager:.2f}x", search if name == r["side"] else ""])
    return rows


def loss_rows(record: dict) -> list[list[str]]:
    reports = record["reports"]
    any_report = reports.get("fused") or reports.get("torch")
    if not any_report:
        return []
    points = {role: {x["batch"]: x for x in r["results"]} for role, r in reports.items()}
    shape = (f"K {any_report['dino']['k']}, {any_report['dino']['global_crops']}+{any_report['dino']['local_crops']} "
             f"crops" if any_report["dino"] else f"dim {any_report['dim']}")
    rows = []
    for batch in sorted({b for p in points.values() for b in p}):
        f, t = points.get("fused", {}).get(batch, {}), points.get("torch", {}).get(batch, {})

        def fig(x: dict) -> tuple[str, str]:
            if "peak_alloc_bytes" not in x:
                return (x.get("failed") or x.get("skipped") or "not run")[:120], "-"
            time_s = "interpreter" if x["backend"] == "interpreter" else secs(min(x["time_s"]))
            return time_s, gib(x["peak_alloc_bytes"])

        (ft, fm), (tt, tm) = fig(f), fig(t)
        both = "peak_alloc_bytes" in f and "peak_alloc_bytes" in t
        timed = both and f["backend"] != "interpreter"
        rows.append([any_report["loss"], str(batch), f"{shape}, {any_report['dtype']}", ft, fm, tt, tm,
                     f"{min(f['time_s']) / min(t['time_s']):.2f}x" if timed else "-",
                     f"{f['peak_alloc_bytes'] / t['peak_alloc_bytes']:.3f}x" if both else "-"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def markdown(suite: dict) -> str:
    env, parts = suite["environment"], suite["parts"]
    probe = next((p["reports"].get("main") for p in parts if p["kind"] == "env"), None) or {}
    device = (probe.get("gpu") or {}).get("name") or probe.get("cpu") or "unknown"
    versions = ", ".join(f"{k} {v}" for k, v in (probe.get("versions") or {}).items())
    lines = [f"# GPU suite ({suite['mode']})", ""]
    if not suite["figures_meaningful"]:
        lines += [f"**{suite['note']}**", ""]
    lines += [f"- date: {env['date_utc']} UTC; total {suite['seconds']:.0f} s of a {suite['budget_s']:.0f} s budget",
              f"- device: {device}; host {probe.get('host', '?')}, {probe.get('cores', '?')} cores; python "
              f"{probe.get('python', '?')}; deepspeed accelerator {probe.get('deepspeed_accelerator', '-')}",
              f"- versions: {versions or 'unknown (env part failed)'}", f"- install: {env['install']}",
              f"- commit: {env['commit']}; command: `{env['command']}`", "",
              "## Parts", ""]
    lines += table(["part", "what", "status", "seconds", "slice / limit (s)", "notes"],
                   [[p["name"], WHAT[p["kind"]], p["status"], f"{p.get('seconds', 0):.0f}",
                     f"{p['slice_s']:.0f} / {p['limit_s']:.0f}", p["error"] or ""] for p in parts])
    train = [row for p in parts if p["kind"] == "train" for row in train_rows(p)]
    if train:
        lines += ["", "## Train steps", "",
                  "samples/s from each side's median step; MFU against the datasheet's dense peak (CPU: the measured "
                  "fp32 GEMM rate); first step includes compilation; ratios of samples/s, above 1 = faster.", ""]
        lines += table(["part", "side", "batch", "step (median)", "samples/s", "MFU", "peak memory", "first step",
                        "vs open_clip (same mode)", "compiled / eager", "batch search"], train)
    loss = [row for p in parts if p["kind"] == "loss" for row in loss_rows(p)]
    if loss:
        lines += ["", "## Losses: fused Triton vs torch reference", "",
                  "time: best of the repeats, forward + backward; peak: tensor memory above the inputs; ratios "
                  "fused / torch, below 1 = faster / less memory.", ""]
        lines += table(["loss", "batch", "shape", "fused time", "fused peak", "torch time", "torch peak",
                        "time ratio", "memory ratio"], loss)
    return "\n".join(lines) + "\n"


def git_state() -> str:
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        return run("rev-parse", "--short=10", "HEAD") + (" + edits" if run("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):  # the device tool's copy of the tree has no .git
        return os.environ.get("CLIPDINO_COMMIT", "unknown (no git here; set CLIPDINO_COMMIT)")


# ----------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--env-probe":
        return env_probe(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (needs --tiny); the figures mean nothing")
    p.add_argument("--tiny", action="store_true", help="tiny models, batches and K: a smoke run of every step")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the .json and .md")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default: the sum of the slices)")
    p.add_argument("--only", default=None, help="comma-separated parts (debugging)")
    args = p.parse_args(argv)
    if args.cpu and not args.tiny:
        p.error("--cpu runs only with --tiny (a ViT-B/16 step takes many seconds on a CPU)")
    parts = plan(args.tiny, args.cpu)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {x.name for x in parts}
        if unknown:
            p.error(f"unknown part(s) {', '.join(sorted(unknown))}")
        parts = [x for x in parts if x.name in wanted]
    budget = args.budget or sum(x.slice_s for x in parts)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    now = datetime.now(timezone.utc)
    mode = ("cpu" if args.cpu else "gpu") + (" --tiny" if args.tiny else "")
    suite: dict[str, Any] = {
        "suite": "clipdino GPU suite (benchmarks/gpu_suite.py)", "mode": mode, "budget_s": budget,
        "figures_meaningful": not (args.cpu or args.tiny),
        "note": (f"a {mode} dry run: tiny models, batches and K; every step ran, but its figures mean nothing"
                 if args.cpu or args.tiny else "ViT-B/16 bf16 on one GPU"),
        "environment": {"date_utc": now.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_state(),
                        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
                        "install": os.environ.get("GPU_SUITE_INSTALL", "none (run without benchmarks/gpu_suite.sh)")},
        "slices_s": {x.name: x.slice_s for x in parts}, "parts": []}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_suite_{now.strftime('%Y%m%d_%H%M%S')}{'_cpu' if args.cpu else ''}{'_tiny' if args.tiny else ''}"
    started, done = time.monotonic(), {}
    print(f"[gpu suite] {mode}: {len(parts)} parts, budget {budget:.0f} s -> {stem}.{{json,md}}", flush=True)
    with tempfile.TemporaryDirectory(prefix="clipdino_gpu_suite_") as scratch:
        for i, part in enumerate(parts):
            reserved = sum(x.slice_s for x in parts[i + 1:])
            limit = budget - (time.monotonic() - started) - reserved
            if limit < min(part.slice_s, 10.0):
                record = {"name": part.name, "kind": part.kind, "slice_s": part.slice_s, "limit_s": max(limit, 0),
                          "status": "not run", "error": "the budget was spent", "seconds": 0, "commands": {},
                          "reports": {}, "logs": {}}
            else:
                print(f"[gpu suite] {part.name}: running (slice {part.slice_s:.0f} s, limit {limit:.0f} s)",
                      flush=True)
                record = run_part(part, Path(scratch), done, limit, env)
            done[part.name] = record
            suite["parts"].append(record)
            print(f"[gpu suite] {part.name}: {record['status']} ({record['seconds']:.0f} s)"
                  + (f": {record['error']}" if record["error"] else ""), flush=True)
            if record["status"] in ("failed", "timed out"):
                print("\n".join(f"    {line}" for line in record["logs"].get(next(iter(record["logs"]), ""), [])[-8:]),
                      flush=True)
    suite["seconds"] = time.monotonic() - started
    text = markdown(suite)
    stem.with_suffix(".json").write_text(json.dumps(suite, indent=2))
    stem.with_suffix(".md").write_text(text)
    print("\n" + text, flush=True)
    print(f"[gpu suite] wrote {stem}.json and {stem}.md", flush=True)
    return 0 if all(x["status"] == "ok" for x in suite["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The table of `launch/bench.py all` (launch/bench_all.py): each part's raw JSON reports -> one markdown row, and the
header (date, host, device, versions, commit, command) above it."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("part", "what is measured", "configuration", "our figure", "reference figure", "ratio", "notes")
MEASURED = {"train": "one train step (forward, backward, grad clip, AdamW; DINO: + EMA teacher): samples/s of the "
                     "median step",
            "data": "training loader images/s: read shards, decode, augment, batch",
            "loss": "loss forward + backward: peak tensor memory above the inputs; wall time",
            "eval": "eval harness: encoder forward and whole-pipeline (read, decode, resize, forward) images/s; "
                    "small-preset linear probe wall time (4000/500 samples)",
            "vlm": "VLM stage-2 step (projector + LLM trained): samples/s of the median step"}


# ----------------------------------------------------------------------------- figures -> table cells
def num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def mem(b: Optional[float]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def secs(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def train_cells(reports: dict, _: dict) -> dict[str, str]:
    r = reports["main"]
    ref = r.get("ref_result")
    crops = r.get("dino_crops")
    config = (f"{r['model']} {r['objective']}, batch {r['batch']}, {r['precision']}, {r['image_size']} px"
              + (f" ({crops[0]}x{crops[1]} + {crops[2]}x{crops[3]} px crops)" if crops else "")
              + f", {r['warmup']} warm-up + {r['steps']} timed steps, {r['device']}")
    notes = ["ours / open_clip samples/s, sides alternated step by step; above 1 = ours faster"] if ref else []
    if r["objective"] in ("dino", "hybrid") and not ref:
        notes.append("no reference: open_clip has no self-distillation step")
    if r.get("ref_skipped"):
        notes.append(r["ref_skipped"])
    cuda, peak = r["device"].startswith("cuda"), "peak" if r["device"].startswith("cuda") else "process peak RSS"
    return {"configuration": config,
            "our figure": f"{num(r['samples_per_s'])} samples/s (MFU {pct(r['mfu'])}, {peak} "
                          f"{mem(r['peak_mem_bytes'])})",
            "reference figure": (f"open_clip {num(ref['samples_per_s'])} samples/s (MFU {pct(ref['mfu'])}"
                                 + (f", peak {mem(ref['peak_mem_bytes'])})" if cuda else ")")) if ref else "-",
            "ratio": ratio(r.get("ratio")), "notes": "; ".join(notes)}


def data_cells(reports: dict, others: dict) -> dict[str, str]:
    r = reports["main"]
    crops = r.get("crops")
    view = (f"{crops[0]}x{crops[1]} + {crops[2]}x{crops[3]} px crops" if crops else f"one {r['image_size']} px view")
    config = (f"{r['task']} ({view}), {r['threads']} thread(s), batch {r['batch']}, {r['warmup']} + {r['batches']} "
              f"batches, {r['shard_count']} shards of {r.get('source_size') or '?'} px JPEGs")
    loader = "DALI loader, CPU decoding" if r["backend"] == "dali" else "PIL/torchvision loader"
    cells = {"configuration": f"{loader}; {config}",
             "our figure": f"{num(r['images_per_s'])} images/s ({num(r['images_per_s_per_thread'])} per thread)",
             "reference figure": "-", "ratio": "-", "notes": f"threads: {r['threads_meaning']}"}
    pil = (others.get("data_pil") or {}).get("main")
    if r["backend"] == "dali" and pil:
        cells["reference figure"] = f"PIL/torchvision loader (row data_pil) {num(pil['images_per_s'])} images/s"
        cells["ratio"] = ratio(r["images_per_s"] / pil["images_per_s"])
        cells["notes"] += "; DALI / PIL images/s, above 1 = DALI faster; DALI's GPU (mixed) decoding is not timed"
    elif r["backend"] == "cpu":
        cells["notes"] += "; no outside reference (row data_dali compares DALI with it)"
    return cells


def loss_points(report: Optional[dict]) -> dict[int, dict]:
    return {x["batch"]: x for x in (report or {}).get("results", []) if "peak_alloc_bytes" in x}


def loss_cells(reports: dict, _: dict) -> dict[str, str]:
    """Fused Triton (ours) vs torch at the largest batch both measured (else the largest either measured)."""
    ours, ref = reports.get("ours"), reports.get("reference")
    a_points, b_points, r = loss_points(ours), loss_points(ref), ours or ref
    batch = max(a_points.keys() & b_points.keys() or a_points.keys() or b_points.keys(), default=None)
    a, b = a_points.get(batch), b_points.get(batch)
    shape = (f"K {r['dino']['k']}, {r['dino']['global_crops']} + {r['dino']['local_crops']} crops" if r["dino"]
             else f"dim {r['dim']}")
    notes = [f"batch {x['batch']}: {x.get('failed') or x.get('skipped')}" for rep in (ours, ref) if rep
             for x in rep["results"] if "peak_alloc_bytes" not in x]

    def figure(x: Optional[dict], label: str) -> str:
        if x is None:
            return "-"
        took = "time not a figure" if x["backend"] == "interpreter" else secs(min(x["time_s"]))
        return f"{label} ({x['backend']}): {mem(x['peak_alloc_bytes'])} peak, {took}"

    cells = {"configuration": f"{r['loss']}, batch {batch if batch is not None else '-'}, {shape}, {r['dtype']}, "
                              f"{r['device']}", "our figure": figure(a, "fused Triton"),
             "reference figure": figure(b, "torch reference"), "ratio": "-"}
    interpreted = a is not None and a["backend"] == "interpreter"
    if a and b:
        cells["ratio"] = f"memory {ratio(a['peak_alloc_bytes'] / b['peak_alloc_bytes'])}" + (
            "" if interpreted else f", time {ratio(min(a['time_s']) / min(b['time_s']))}")
        notes.insert(0, "fused / torch; below 1 = less memory, faster")
    if interpreted:
        notes.append("the kernels ran in Triton's CPU interpreter: only the memory figure counts")
    cells["notes"] = "; ".join(notes)
    return cells


def eval_cells(reports: dict, _: dict) -> dict[str, str]:
    r = reports["main"]
    models = r["models"]
    ours = "; ".join(f"{name}: forward {num(e['forward']['images_per_s'])} img/s, pipeline "
                     f"{num(e['pipeline']['images_per_s'])} img/s, probe {num(e['probe_small']['seconds'])} s"
                     for name, e in models.items())
    config = "; ".join(f"{name} ({num(e['params_m'])}M, {e['config']['image_size']} px, forward batch "
                       f"{e['forward']['batch']}, pipeline {e['pipeline']['images']} images, {e['pipeline']['workers']}"
                       " workers)" for name, e in models.items())
    paper = ", ".join(f"{name} ~{e['probe_paper_step']['paper_preset_estimate_s'] / 3600:.1f} h"
                      for name, e in models.items())
    return {"configuration": f"{config}; {r['threads']} torch threads", "our figure": ours,
            "reference figure": "-", "ratio": "-",
            "notes": f"eval.bench runs the encoders on the CPU, even beside a GPU; paper-preset ImageNet probe "
                     f"estimate: {paper}"}


def vlm_cells(reports: dict, _: dict) -> dict[str, str]:
    r = reports["main"]
    o, p, parity = r["ours"], r["plain"], r["parity"]
    engine = r["engine"] + (f" ZeRO-{r['zero_stage']}" if r.get("zero_stage") is not None else "")
    return {"configuration": f"{r['llm']} + {r['vision']} tower, batch {r['batch']} x ({r['image_tokens']} image + <= "
                             f"{r['text_tokens']} text tokens), {r['dtype']}, engine {engine}, {r['warmup']} warm-up "
                             f"+ {r['steps']} timed steps, {r['device']}",
            "our figure": f"{num(o['samples_per_s'])} samples/s ({num(o['tokens_per_s'])} tokens/s, "
                          f"MFU {pct(o['mfu'])})",
            "reference figure": f"transformers {num(p['samples_per_s'])} samples/s ({num(p['tokens_per_s'])} tokens/s, "
                                f"MFU {pct(p['mfu'])})",
            "ratio": ratio(r["ratio"]),
            "notes": f"ours / plain transformers samples/s, same weights and batch, alternated; above 1 = ours faster; "
                     f"loss |diff| {parity['loss_abs_diff']:.1e}, gradients max rel. diff "
                     f"{parity['grad_max_rel_diff']:.1e}"}


CELLS: dict[str, Callable[[dict, dict], dict[str, str]]] = {
    "train": train_cells, "data": data_cells, "loss": loss_cells, "eval": eval_cells, "vlm": vlm_cells}


def load_note(reports: dict[str, dict]) -> str:
    """The machine's 1-minute load average when the part's first report started and its last one ended."""
    starts = [r.get("loadavg_start", r.get("load_before")) for r in reports.values()]
    ends = [r.get("loadavg_end", r.get("load_after")) for r in reports.values()]
    if not reports or starts[0] is None or ends[-1] is None:
        return ""
    return f", load {starts[0][0]:.2f} -> {ends[-1][0]:.2f}"


def table_row(record: dict[str, Any], reports_by_part: dict[str, dict]) -> dict[str, str]:
    """The part's cells from its reports; its status (and the error's last line) and wall time in the notes."""
    cells = {c: "-" for c in COLUMNS}
    cells.update(part=record["name"], notes="", configuration=f"options {record['options']}")
    cells["what is measured"] = MEASURED[record["group"]]
    if record["reports"]:
        try:
            cells.update(CELLS[record["group"]](record["reports"], reports_by_part))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            cells["notes"] = f"figures unreadable: {type(e).__name__}: {e}"
    if record["status"] == "ok" and cells["our figure"] == "-":
        record["status"], record["error"] = "failed", f"no figure measured ({cells['notes'] or 'empty report'})"
    status = "" if record["status"] == "ok" else f"**{record['status']}**: {record['error']}"
    ran = record["status"] not in ("skipped", "not run")
    timing = f"{record['seconds']:.0f} s{load_note(record['reports'])}" if ran else ""
    cells["notes"] = "; ".join(x for x in (status, cells["notes"], timing) if x)
    return {k: str(v).replace("|", "\\|").replace("\n", " ") for k, v in cells.items()}


# ----------------------------------------------------------------------------- header and output
def versions() -> dict[str, str]:
    def version(*dists: str) -> str:
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
        return "absent"

    dali = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")})
    return {"python": platform.python_version(), "torch": version("torch"), "triton": version("triton"),
            "deepspeed": version("deepspeed"), "transformers": version("transformers"),
            "open_clip": version("open_clip_torch", "open-clip-torch"), "timm": version("timm"),
            "webdataset": version("webdataset"), "DALI": version(*dali) + (f" ({dali[0]})" if dali else "")}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        edits = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted edits" if edits else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(preset: str) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
            "preset": preset, "cpu": cpu_model(), "cores": os.cpu_count(),
            "gpu": f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})" if cuda else "none",
            "versions": versions(), "commit": git_state(), "loadavg_start": list(os.getloadavg()),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}


def markdown(env: dict[str, Any], rows: list[dict[str, str]], records: list[dict[str, Any]]) -> str:
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "timed out", "not run", "skipped")}
    head = [f"# `launch/bench.py all` (preset {env['preset']})", "",
            f"- date: {env['date_utc']} UTC; total {env['seconds']:.0f} s; load average "
            f"{env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}",
            f"- host: {env['host']}; CPU: {env['cpu']} ({env['cores']} cores); GPU: {env['gpu']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            f"- commit: {env['commit']}",
            f"- command: `{env['command']}`",
            "- parts: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
            "- ratio: ours / reference of the row's figure; the notes say which way is better", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(head + ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]) + "\n"

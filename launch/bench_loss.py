#!/usr/bin/env python
"""`python launch/bench.py loss`: time and peak memory of one loss forward + backward, torch vs the fused kernels.

    python launch/bench.py loss --loss clip --impl torch  --batch 1024 2048 4096 --dim 512 --json out.json
    python launch/bench.py loss --loss dino --impl triton --batch 16 32 64 --k 65536 --local-crops 10
    python launch/bench.py loss --plot memory.png --from a.json b.json ...     (peak memory vs batch)

Every batch size runs in a fresh child process (one process = one configuration), on random unit features
(CLIP/SigLIP: one process holds the whole batch, local = global) or random logits (DINO). Measured:

* ``peak_alloc_bytes``: the largest amount of tensor memory allocated by the loss forward + backward above
  what existed before it (inputs excluded; outputs, saved tensors, temporaries and input gradients included).
  CUDA: ``torch.cuda.max_memory_allocated``. CPU: the CPU allocator's allocation / free events recorded by
  ``torch.profiler(profile_memory=True)``, forward and backward separately
  (peak = max(forward peak, held after forward + backward peak)).
* ``held_after_forward_bytes``: what stays allocated between forward and backward (saved for backward).
* ``rss_peak_delta_bytes``: the process's peak resident set above its size before the call (Linux VmHWM after
  a reset); whole-process, so on CPU it includes the Triton interpreter's own numpy work buffers.
* ``time_s``: wall time of each call. Under the Triton CPU interpreter it is meaningless for performance.

With ``impl=triton`` on a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set in the child):
the tensors the autograd Function allocates are the ones a GPU run would allocate, so ``peak_alloc_bytes``
is the figure to compare; the interpreter's work buffers appear only in the RSS column.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import _bootstrap  # noqa: F401  (repo root on sys.path)

LOSSES = ("clip", "siglip", "dino")
DTYPES = ("fp32", "bf16")
GIB = 2 ** 30


# ----------------------------------------------------------------------------- child: one configuration
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def build_case(spec: dict[str, Any]) -> tuple[Callable[[], Any], list]:
    """(forward() -> loss, leaves whose .grad the backward fills) for one configuration."""
    import torch

    device, batch = torch.device(spec["device"]), spec["batch"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    gen = torch.Generator(device="cpu").manual_seed(0)
    triton = spec["impl"] == "triton"

    def unit(rows: int) -> Any:
        x = torch.randn(rows, spec["dim"], generator=gen)
        return (x / x.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype).requires_grad_()  # (rows, D)

    if spec["loss"] in ("clip", "siglip"):
        from kernels.contrastive_reference import clip_loss, siglip_loss
        from kernels.triton_runtime import PairwiseBlocks

        blocks = PairwiseBlocks(*spec["tiles"]) if spec.get("tiles") else PairwiseBlocks()
        img, txt = unit(batch), unit(batch)
        scale = torch.tensor(14.3 if spec["loss"] == "clip" else 10.0, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        if spec["loss"] == "clip":
            from kernels.contrastive_triton import clip_loss_triton
            if triton:
                return lambda: clip_loss_triton(img, txt, img, txt, scale, 0, blocks), [img, txt, scale]
            return lambda: clip_loss(img, txt, img, txt, scale, 0), [img, txt, scale]
        from kernels.siglip_triton import siglip_loss_triton
        if triton:
            return lambda: siglip_loss_triton(img, txt, scale, bias, 0, blocks), [img, txt, scale, bias]
        return lambda: siglip_loss(img, txt, scale, bias, 0), [img, txt, scale, bias]

    from kernels.dino_reference import dino_loss, teacher_batch_center
    from kernels.dino_triton import dino_loss_and_center_sum
    from kernels.triton_runtime import DinoBlocks

    n_global, n_crops, k = spec["global_crops"], spec["global_crops"] + spec["local_crops"], spec["k"]
    student = (3 * torch.randn(n_crops * batch, k, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    teacher = (3 * torch.randn(n_global * batch, k, generator=gen)).to(device=device, dtype=dtype)
    center = torch.zeros(1, k, device=device)
    blocks = DinoBlocks(*spec["tiles"]) if spec.get("tiles") else DinoBlocks()
    if triton:
        return (lambda: dino_loss_and_center_sum(student, teacher, center, 0.1, 0.04, n_global, blocks)[0]), [student]

    def reference() -> Any:  # the trainer's torch path: fp32 logits, loss + centre sum
        s, t = student.float(), teacher.float()
        teacher_batch_center(t)
        return dino_loss(s, t, center, 0.1, 0.04, n_global)

    return reference, [student]


def _allocations(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """(fn(), peak bytes above the start, bytes still allocated at the end) from the CPU allocator events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    level = peak = 0
    for _, size in sorted(events):
        level += size
        peak = max(peak, level)
    return out, peak, level


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["impl"] == "triton" and spec["device"] == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm, warm_leaves = build_case({**spec, "batch": 8})  # imports, compilation, first-call caches
    warm().backward()
    del warm, warm_leaves
    fn, leaves = build_case(spec)
    if spec["impl"] == "triton":
        from kernels.triton_runtime import backend_for

        backend = backend_for("dino_kernels" if spec["loss"] == "dino" else "pairwise_kernels", leaves[0])
    else:
        backend = "torch"
    out: dict[str, Any] = {"batch": spec["batch"], "backend": backend, "time_s": []}
    hwm_ok = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    for _ in range(spec["repeat"]):
        for leaf in leaves:
            leaf.grad = None
        sync()
        start = time.perf_counter()
        fn().backward()
        sync()
        out["time_s"].append(time.perf_counter() - start)
    out["rss_peak_delta_bytes"] = (_proc_status_kib("VmHWM") - rss_before) * 1024 if hwm_ok else None
    for leaf in leaves:
        leaf.grad = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        loss = fn()
        sync()
        out["held_after_forward_bytes"] = torch.cuda.memory_allocated() - start_bytes
        loss.backward()
        sync()
        out["peak_alloc_bytes"] = torch.cuda.max_memory_allocated() - start_bytes
    else:
        loss, peak_fwd, held = _allocations(fn)
        _, peak_bwd, _ = _allocations(loss.backward)
        out.update(peak_alloc_bytes=max(peak_fwd, held + peak_bwd), held_after_forward_bytes=held)
    out["loss"] = float(loss.detach())
    return out


# ----------------------------------------------------------------------------- parent: the sweep
def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def fit_power(points: list[tuple[int, int]]) -> Optional[dict[str, float]]:
    """Least-squares fit of bytes = a * batch^p on a log-log scale."""
    pts = [(math.log(b), math.log(m)) for b, m in points if m and m > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    p = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else float("nan")
    return {"exponent": p, "coefficient": math.exp(my - p * mx)}


def predicted(fit: Optional[dict[str, float]], batch: int) -> Optional[float]:
    return None if fit is None else fit["coefficient"] * batch ** fit["exponent"]


def cmd_loss(args: argparse.Namespace) -> int:
    if args.plot:
        return plot(args.plot, args.inputs)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = {"loss": args.loss, "impl": args.impl, "device": device, "dtype": args.dtype, "dim": args.dim,
            "k": args.k, "global_crops": args.global_crops, "local_crops": args.local_crops, "repeat": args.repeat,
            "tiles": args.tiles, "threads": args.threads or torch.get_num_threads()}
    started, load_before = datetime.now(timezone.utc).isoformat(timespec="seconds"), os.getloadavg()
    results, notes = [], []
    for batch in args.batch:
        fit = fit_power([(r["batch"], r["peak_alloc_bytes"]) for r in results if "peak_alloc_bytes" in r])
        need, free = predicted(fit, batch), _mem_available()
        if device == "cpu" and need and free and need > args.mem_fraction * free:
            results.append({"batch": batch, "skipped": f"predicted peak {need / GIB:.1f} GiB > "
                            f"{args.mem_fraction:.0%} of the {free / GIB:.1f} GiB available"})
            print(f"[bench loss] batch {batch}: {results[-1]['skipped']}", flush=True)
            continue
        child = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({**spec, "batch": batch})]
        proc = subprocess.run(child, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            results.append({"batch": batch, "failed": last[0]})
            print(f"[bench loss] batch {batch} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"[bench loss] {args.loss} {args.impl} ({r['backend']}) batch {batch}: peak alloc "
              f"{r['peak_alloc_bytes'] / 2**20:.1f} MiB, held after forward {r['held_after_forward_bytes'] / 2**20:.1f}"
              f" MiB, RSS peak delta {(r['rss_peak_delta_bytes'] or 0) / 2**20:.1f} MiB, "
              f"time {min(r['time_s']):.3f} s", flush=True)
    measured = [(r["batch"], r["peak_alloc_bytes"]) for r in results if "peak_alloc_bytes" in r]
    fit = fit_power(measured)
    budget = args.budget_gib * GIB
    if fit and fit["exponent"] > 0:
        fit["largest_batch_within_budget"] = int((budget / fit["coefficient"]) ** (1 / fit["exponent"]))
    backends = {r.get("backend") for r in results if "backend" in r}
    if "interpreter" in backends:
        notes.append("impl=triton ran in Triton's CPU interpreter: time_s is NOT a performance figure")
    report = {"loss": args.loss, "impl": args.impl, "device": device, "dtype": args.dtype,
              "dim": args.dim if args.loss != "dino" else None,
              "dino": None if args.loss != "dino" else {"k": args.k, "global_crops": args.global_crops,
                                                          "local_crops": args.local_crops},
              "tiles": args.tiles, "results": results, "peak_alloc_fit": fit, "budget_gib": args.budget_gib,
              "memory_kinds": {"peak_alloc_bytes": "tensor memory allocated by forward+backward above the inputs "
                               + ("(cuda max_memory_allocated)" if device == "cuda" else
                                  "(CPU allocator events via torch.profiler profile_memory)"),
                               "rss_peak_delta_bytes": "whole-process peak RSS above the RSS before the call"},
              "threads": spec["threads"], "torch_version": torch.__version__, "triton_version": _triton_version(),
              "machine": platform.processor() or platform.machine(), "loadavg_start": list(load_before),
              "loadavg_end": list(os.getloadavg()), "started_at": started,
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "notes": notes}
    if fit:
        print(f"[bench loss] peak alloc ~ batch^{fit['exponent']:.2f}"
              + (f"; fits {args.budget_gib:g} GiB up to batch ~{fit['largest_batch_within_budget']}"
                 if "largest_batch_within_budget" in fit else ""))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"[bench loss] wrote {args.json}")
    return 0


def _triton_version() -> Optional[str]:
    try:
        import importlib.metadata as md
        return md.version("triton")
    except Exception:  # noqa: BLE001  (not installed)
        return None


def plot(png: str, inputs: list[str]) -> int:
    """Peak allocated memory vs batch, log-log: one panel per loss, one line per (impl, dtype); reports of
    the same series are merged, and a dotted line extends each series' power-law fit to the panel's largest batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[tuple[str, str], dict[int, int]]] = {}  # loss -> (impl, dtype) -> batch -> bytes
    for path in inputs:
        rep = json.loads(Path(path).read_text())
        points = series.setdefault(rep["loss"], {}).setdefault((rep["impl"], rep["dtype"]), {})
        points.update({r["batch"]: r["peak_alloc_bytes"] for r in rep["results"] if "peak_alloc_bytes" in r})
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (loss, lines) in zip(axes[0], sorted(series.items())):
        largest = max((b for points in lines.values() for b in points), default=1)
        for (impl, dtype), points in sorted(lines.items()):
            pts = sorted(points.items())
            if not pts:
                continue
            fit = fit_power(pts)
            label = f"{impl} {dtype}" + (f" (~B^{fit['exponent']:.2f})" if fit else "")
            line, = ax.plot([b for b, _ in pts], [m / GIB for _, m in pts], marker="o", label=label,
                            linestyle="--" if impl == "torch" else "-")
            if fit and pts[-1][0] < largest:  # extrapolated, not measured
                xs = [pts[-1][0], largest]
                ax.plot(xs, [predicted(fit, x) / GIB for x in xs], linestyle=":", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (images; one process holds the whole batch)")
        ax.set_ylabel("peak tensor memory, forward + backward (GiB)")
        ax.axhline(24, color="grey", linewidth=0.8)
        ax.text(ax.get_xlim()[0], 24, " 24 GiB", va="bottom", color="grey", fontsize=8)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{loss}: naive torch vs fused triton", fontsize=10)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"[bench loss] wrote {png}")
    return 0


# ----------------------------------------------------------------------------- CLI
def add_parser(commands) -> None:
    p = commands.add_parser("loss", help="loss kernels: time and peak memory vs batch (torch vs triton)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=LOSSES, default="clip")
    p.add_argument("--impl", choices=("torch", "triton"), default="torch")
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 2048, 4096], help="batch sizes (one child each)")
    p.add_argument("--dim", type=int, default=512, help="CLIP/SigLIP feature dim")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--k", type=int, default=65536, help="DINO prototypes")
    p.add_argument("--global-crops", type=int, default=2)
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--tiles", type=int, nargs="+", default=None,
                   help="tile sizes: CLIP/SigLIP m n k d_out [warps stages]; DINO k images [warps stages]")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per batch size")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per batch size")
    p.add_argument("--mem-fraction", type=float, default=0.7,
                   help="CPU: skip a batch whose peak, extrapolated from the smaller ones, exceeds this "
                        "fraction of MemAvailable")
    p.add_argument("--budget-gib", type=float, default=24.0, help="report the largest batch fitting this much")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--plot", default=None, help="instead of measuring: plot --from reports into this PNG")
    p.add_argument("--from", dest="inputs", nargs="+", default=[], help="JSON reports for --plot")
    p.set_defaults(func=cmd_loss, check=check_loss_args)


def check_loss_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.plot and not args.inputs:
        parser.error("--plot needs --from REPORT.json ...")
    if min(args.batch) < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be >= 1")
    if args.loss == "dino" and args.global_crops < 1:
        parser.error("--global-crops must be >= 1")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(run_child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit("run it as `python launch/bench.py loss ...`")

"""Helpers of `launch/bench.py train` (bench_train.py): the step through the trainer's own DeepSpeed engine
(`--engine deepspeed|both`), `torch.compile` of our blocks and of open_clip's model (`--compile`), the ratios
between the sides, and the table.

Side names: `ours` (our objective, torch AdamW outside any engine), `ours[ds-zN]` (the same objective through
`deepspeed.initialize` with train/deepspeed_config.py's config at ZeRO stage N, stepped as train/trainer.py does),
`open_clip`; `+compile` marks the compiled variant of each: ours per transformer block in place (train/compile.py,
what `model.compile=true` runs), open_clip's whole model with `torch.compile(model)` (its `--torchcompile`).
"""
from __future__ import annotations

import gc
from typing import Any, Callable, Optional

import torch

COMPILE_SUFFIX = "+compile"


def engines(arg: str) -> list[str]:
    return ["torch", "deepspeed"] if arg == "both" else [arg]


def our_name(engine: str, zero_stage: int, compiled: bool) -> str:
    base = "ours" if engine == "torch" else f"ours[ds-z{zero_stage}]"
    return base + (COMPILE_SUFFIX if compiled else "")


def compile_our_blocks(objective, device: torch.device, zero3: bool = False) -> list[str]:
    """What `model.compile=true` does in the trainer (train/compile.py), whatever the config says."""
    from train.compile import compile_objective

    return compile_objective(objective, device.type, zero3)


def compile_open_clip(model: torch.nn.Module) -> Callable:
    """open_clip_train/main.py with --torchcompile: `model = torch.compile(original_model)`, default arguments;
    the optimizer and the logit-scale clamp keep using the original module."""
    return torch.compile(model)


def build_deepspeed_step(cfg, objective, batch, device: torch.device, autocast, first_step: int
                         ) -> tuple[Callable[[int], None], Any]:
    """(step(i), engine): one optimizer step as train/trainer.py runs it on one rank without accumulation: per-group
    LR / weight decay / held flags, compute_loss through the engine, engine.backward, (DINO's per-parameter clip),
    engine.step, objective.after_step. The objective must already be on `device` (and compiled, if wanted)."""
    import deepspeed

    from train.deepspeed_config import build_deepspeed_config
    from train.distributed import init_distributed
    from train.optim import build_adamw, clip_gradients_per_param, param_groups

    init_distributed()  # a world of one (gloo on CPU), as `python launch/pretrain.py` sets up
    groups = param_groups(objective.student, cfg.optim.weight_decay, objective.no_weight_decay_names(),
                          objective.group_of)
    optimizer = build_adamw(groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps)
    ds_config = build_deepspeed_config(cfg, batch.images.shape[0] if batch.images is not None else
                                       batch.crops[0].shape[0], 1, 1, objective)
    engine, optimizer, _, _ = deepspeed.initialize(model=objective.student, optimizer=optimizer, config=ds_config,
                                                   dist_init_required=False)
    per_param = getattr(cfg.optim, "clip_mode", "global") == "per_param" and cfg.optim.grad_clip > 0

    def step(i: int) -> None:
        i += first_step
        for group in engine.optimizer.param_groups:
            scale = objective.lr_scale(group["name"], i)
            group["lr"] = cfg.optim.lr * scale
            group["held"] = scale == 0.0
            group["weight_decay"] = cfg.optim.weight_decay if group["apply_decay"] else 0.0
        with autocast:
            loss = objective.compute_loss(engine, batch, i)["loss"]
        engine.backward(loss)
        if per_param:
            clip_gradients_per_param(engine.module.parameters(), cfg.optim.grad_clip)
        engine.step()
        objective.after_step(i)

    return step, engine


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def search_batch(probe: Callable[[int], int], candidates: list[int], limit_bytes: Optional[int]
                 ) -> tuple[int, list[dict[str, Any]]]:
    """`--batch auto`: the largest candidate whose probe (build our eager side, run two steps: the optimizer state
    exists in the second) neither runs out of memory nor peaks above `limit_bytes` (None: no limit).
    `probe(batch) -> peak bytes`. Returns (batch, what each try gave); RuntimeError when no candidate fits."""
    tried: list[dict[str, Any]] = []
    for batch in sorted(set(candidates), reverse=True):
        error = None
        try:
            peak = probe(batch)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        free_memory()  # outside the except clause: the traceback's frames (and their tensors) are gone by now
        if error is not None:
            tried.append({"batch": batch, "result": "out of memory", "error": error})
        elif limit_bytes is not None and peak > limit_bytes:
            tried.append({"batch": batch, "result": "over the memory limit", "peak_bytes": peak,
                          "limit_bytes": limit_bytes})
        else:
            tried.append({"batch": batch, "result": "ok", "peak_bytes": peak, "limit_bytes": limit_bytes})
            return batch, tried
    raise RuntimeError(f"--batch auto: no candidate batch fits: {tried}")


def ratios(results: dict[str, dict[str, Any]], ref: Optional[str], key: str = "samples_per_s") -> dict[str, float]:
    """samples/s ratios (of medians; key="samples_per_s_best": of the fastest steps): compiled / eager per
    contender, each of ours / open_clip (eager with eager, compiled with compiled), and the DeepSpeed engine /
    torch AdamW outside it."""
    out: dict[str, float] = {}

    def add(a: str, b: str) -> None:
        if a in results and b in results and a != b:
            out[f"{a} / {b}"] = results[a][key] / results[b][key]

    for name in results:
        if not name.endswith(COMPILE_SUFFIX):
            add(name + COMPILE_SUFFIX, name)
    if ref:
        for name in results:
            if name.startswith("ours"):
                add(name, ref + (COMPILE_SUFFIX if name.endswith(COMPILE_SUFFIX) else ""))
    for name in results:
        if name.startswith("ours[ds-"):
            add(name, "ours" + (COMPILE_SUFFIX if name.endswith(COMPILE_SUFFIX) else ""))
    return out


def print_table(report: dict[str, Any], results: list[dict[str, Any]], names: list[str]) -> None:
    def mem(v: Optional[int]) -> str:
        return "-" if v is None else f"{v / 2**30:.2f} GiB"

    rows = [("params (M)", lambda r: f"{r['params'] / 1e6:.1f}"),
            ("first step (s)", lambda r: f"{r['first_step_s']:.2f}"),
            ("step time median (s)", lambda r: f"{r['step_time_median_s']:.4f}"),
            ("step time mean (s)", lambda r: f"{r['step_time_mean_s']:.4f}"),
            ("step time min (s)", lambda r: f"{r['step_time_min_s']:.4f}"),
            ("samples/s (median)", lambda r: f"{r['samples_per_s']:.2f}"),
            ("samples/s (mean)", lambda r: f"{r['samples_per_s_mean']:.2f}"),
            ("achieved TFLOP/s", lambda r: f"{r['achieved_flops_per_s'] / 1e12:.4f}"),
            ("MFU", lambda r: "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
            ("peak memory", lambda r: mem(r["peak_mem_bytes"]))]
    print(f"train-step benchmark: {report['model']} {report['objective']}, batch {report['batch']}, "
          f"{report['precision']} on {report['device']} ({report['device_name']}, {report['threads']} threads), "
          f"torch {report['torch_version']}")
    print(f"{report['flops_per_sample'] / 1e9:.2f} GFLOP/sample (train), peak {report['peak_flops'] / 1e12:.3f} "
          f"TFLOP/s ({report['peak_flops_source']}); {report['warmup']} warm-up + {report['steps']} timed steps "
          "per side")
    if report["dino_crops"]:
        g, gs, n, ls = report["dino_crops"]
        print(f"DINO crops: {g} x {gs} px global + {n} x {ls} px local")
    width = max(16, *(len(n) + 2 for n in names))
    print(f"{'':24s}" + "".join(f"{n:>{width}s}" for n in names))
    for label, fmt in rows:
        print(f"{label:24s}" + "".join(f"{fmt(r):>{width}s}" for r in results))
    if report["ratio"] is not None and f"{names[0]} / {report['ref']}" not in report["ratios"]:
        print(f"ratio {names[0]} / {report['ref']} (samples/s, medians): {report['ratio']:.3f}")
    for label, value in report["ratios"].items():
        print(f"ratio {label} (samples/s): medians {value:.3f}, fastest steps {report['ratios_best_step'][label]:.3f}")
    print(f"memory: {report['peak_mem_kind']}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"load average start {report['loadavg_start'][0]:.2f}, end {report['loadavg_end'][0]:.2f}")

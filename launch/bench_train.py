#!/usr/bin/env python
"""`python launch/bench.py train`: time one training step, ours and optionally open_clip's.

    python launch/bench.py train --model vit_b16 --objective clip --batch 8 --vs open_clip --json out.json
    python launch/bench.py train --model vit_b16 --objective dino --batch 4 [--local-crops 10] [key=value ...]
    python launch/bench.py train --model vit_s16 --objective clip --batch 8 --vs open_clip --compile --engine both
    python launch/bench.py train --model vit_b16 --objective clip --batch auto --batch-candidates 1024,768,512 --vs open_clip

Times OUR train step in one process on the current device: `objective.compute_loss` on
synthetic tensors (under bf16 autocast on CUDA by default), backward, gradient clipping, torch
AdamW with the trainer's parameter groups, `objective.after_step` (DINO's EMA). With the default
`--engine torch` there is no DeepSpeed engine (deepspeed is never imported); `--engine deepspeed`
steps the same objective through the trainer's own engine (deepspeed.initialize with
train/deepspeed_config.py's config, ZeRO stage as configured: deepspeed.zero_stage=N), `--engine both`
times both. `--vs open_clip` times open_clip's own model, loss and optimizer (as in its
training/main.py) on the same inputs. `--compile` adds the compiled variant of every side: ours with
torch.compile per transformer block (model.compile=true, train/compile.py), open_clip with
torch.compile(model) (its --torchcompile). All sides alternate step by step after their warm-ups.
`--batch auto` first probes our eager step at each of `--batch-candidates`, largest first (build, two steps), and
times the largest that neither runs out of memory nor peaks above `--mem-fraction` of the GPU's memory (on a CPU:
the largest that runs); the report's `batch_search` says what each try gave.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import _bootstrap  # noqa: F401  (repo root on sys.path)
import torch

DEFAULT_BATCH_CANDIDATES = (1024, 768, 512, 384, 256, 128, 64, 32, 16, 8)  # --batch auto
VOCAB_SIZE, EOT_ID = 49408, 49407  # open_clip's BPE vocabulary; the end-of-text id is the largest


def preset(size: str, patch: int, image: int, text: tuple[int, int, int, int], embed: int,
           dino_head: tuple[int, int, int] = (65536, 2048, 256)) -> list[str]:
    """Config overrides of one architecture: text = (width, heads, layers, context), dino_head = (out, hidden, bottleneck)."""
    (width, heads, layers, context), (out, hidden, bottleneck) = text, dino_head
    return [f"model.vision.size={size}", f"model.vision.patch_size={patch}", f"model.vision.image_size={image}",
            "model.vision.pre_norm=true", f"model.text.width={width}", f"model.text.heads={heads}",  # ln_pre: open_clip's
            f"model.text.layers={layers}", f"model.text.context_length={context}", f"model.embed_dim={embed}",
            f"model.dino_head.out_dim={out}", f"model.dino_head.hidden_dim={hidden}",
            f"model.dino_head.bottleneck_dim={bottleneck}"]


# name -> (config overrides, open_clip's registered model name, or None: open_clip.model.CLIP built from our dims)
MODELS: dict[str, tuple[list[str], Optional[str]]] = {
    "vit_b16": (preset("base", 16, 224, (512, 8, 12, 77), 512), "ViT-B-16"),
    "vit_s16": (preset("small", 16, 224, (384, 6, 12, 77), 384), None),  # open_clip ViT-S-16's dims
    "vit_ti16": (preset("tiny", 16, 224, (256, 4, 12, 77), 256), None),
    "vit_micro": (preset("micro", 8, 64, (128, 4, 4, 32), 128, (1024, 256, 64)), None),  # launch/.../base_tiny.yaml
}
TRAIN_OBJECTIVES = ("clip", "siglip", "dino", "hybrid")
TEXT_OBJECTIVES = ("clip", "siglip", "hybrid")
DINO_OBJECTIVES = ("dino", "hybrid")


@dataclass
class Side:
    """One contender: a step function and what it measured."""
    name: str
    step: Callable[[int], None]
    params: int
    resident_bytes: int = 0  # parameters + optimizer state (+ teacher) on the GPU
    times: list[float] = field(default_factory=list)
    first_step: float = 0.0  # the first warm-up step (a compiled side compiles there)
    activation_peak: int = 0  # max over timed steps of (peak allocated - allocated at the step's start)
    counter: int = 0


# ----------------------------------------------------------------------------- config and inputs
def bench_config(args: argparse.Namespace):
    """PretrainConfig from defaults (or --config) + the model preset + bench settings + user overrides."""
    from train.config_loader import load_config

    presets = [] if args.model is None else MODELS[args.model][0]
    base = load_config(args.config, presets)
    size = args.image_size or base.model.vision.image_size
    patch = base.model.vision.patch_size
    local = max(patch, round(96 * size / 224 / patch) * patch)  # DINO's 96 px locals at 224, scaled
    bench = [f"objective.name={args.objective}", f"model.vision.image_size={size}",
             f"dino.global_crop_size={size}", f"dino.local_crop_size={local}", f"dino.n_local_crops={args.local_crops}",
             f"model.text.vocab_size={VOCAB_SIZE}", f"model.text.eot_id={EOT_ID}", "logging.wandb=disabled"]
    if args.peak_flops:
        bench.append(f"logging.peak_flops={args.peak_flops}")
    return load_config(args.config, presets + bench + list(args.overrides))


@contextlib.contextmanager
def throwaway_tokenizer(cfg):
    """The text tower reads only the vocab size and eot id from data.tokenizer (both forced here):
    point it at a tiny sentencepiece model trained on the fly, deleted afterwards."""
    if cfg.objective.name not in TEXT_OBJECTIVES:
        yield
        return
    from data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="clipdino_bench_") as folder:
        captions = [f"a photo of {n} {c} {s}" for n in ("one", "two", "three") for c in ("red", "blue", "green")
                    for s in ("star", "circle", "square")]
        previous, cfg.data.tokenizer = cfg.data.tokenizer, train_tokenizer(captions, f"{folder}/spm", vocab_size=40)
        try:
            yield
        finally:
            cfg.data.tokenizer = previous


def synthetic_batch(cfg, batch: int, device: torch.device, seed: int = 0):
    """Normalised random images / crops and random token ids ending in the eot id, padded with 0."""
    from data.loader import Batch

    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)

    def images(size: int) -> torch.Tensor:
        return ((torch.rand(batch, 3, size, size, generator=gen) - mean) / std).to(device)

    out = Batch(keys=[f"synthetic-{i:06d}" for i in range(batch)])
    name = cfg.objective.name
    if name in TEXT_OBJECTIVES:
        out.images = images(cfg.model.vision.image_size)
        length = cfg.model.text.context_length
        tokens = torch.zeros(batch, length, dtype=torch.long)
        for row in range(batch):
            n = int(torch.randint(min(5, length), length + 1, (1,), generator=gen))
            tokens[row, : n - 1] = torch.randint(4, EOT_ID, (n - 1,), generator=gen)
            tokens[row, n - 1] = EOT_ID
        out.tokens = tokens.to(device)
    if name in DINO_OBJECTIVES:
        d = cfg.dino
        out.crops = ([images(d.global_crop_size) for _ in range(d.n_global_crops)]
                     + [images(d.local_crop_size) for _ in range(d.n_local_crops)])
    return out


def resolve_precision(requested: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if requested == "auto" else requested


def autocast_for(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# ----------------------------------------------------------------------------- the two train steps
def build_our_side(cfg, batch_size: int, device: torch.device, precision: str, engine: str = "torch",
                   compiled: bool = False) -> tuple[Side, Any]:
    from bench_train_engine import build_deepspeed_step, compile_our_blocks, our_name
    from train.objectives.registry import build_objective
    from train.optim import build_adamw, param_groups

    steps_per_epoch = 1000
    torch.manual_seed(cfg.seed)
    with throwaway_tokenizer(cfg):
        objective = build_objective(cfg, steps_per_epoch, total_steps=10 * steps_per_epoch)
    if cfg.model.vision.grad_checkpointing:
        objective.student.set_grad_checkpointing(True)
    stage = cfg.deepspeed.zero_stage
    if compiled:  # as the trainer: after gradient checkpointing, before the engine
        compile_our_blocks(objective, device, zero3=engine == "deepspeed" and stage == 3)
    objective.to(device)
    student = objective.student.train()
    name, params = our_name(engine, stage, compiled), sum(p.numel() for p in student.parameters())
    first_step = 2 * steps_per_epoch  # past DINO's frozen last layer and teacher-temperature warm-up
    if engine == "deepspeed":
        batch = synthetic_batch(cfg, batch_size, device, cfg.seed)
        step, _ = build_deepspeed_step(cfg, objective, batch, device, autocast_for(precision, device), first_step)
        return Side(name, step, params), objective
    groups = param_groups(student, cfg.optim.weight_decay, objective.no_weight_decay_names(), objective.group_of)
    optimizer = build_adamw(groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps)
    trained = [p for g in groups for p in g["params"]]
    batch = synthetic_batch(cfg, batch_size, device, cfg.seed)
    autocast, clip = autocast_for(precision, device), cfg.optim.grad_clip

    def step(i: int) -> None:
        i += first_step
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * objective.lr_scale(group["name"], i)
        with autocast:
            loss = objective.compute_loss(student, batch, i)["loss"]
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(i)

    return Side(name, step, params), objective


def build_open_clip_side(cfg, model_name: str, batch_size: int, device: torch.device, precision: str,
                         compiled: bool = False) -> Side:
    """open_clip's model, loss, optimizer groups and step, as its training/main.py + train.py do them
    (`compiled`: its --torchcompile, the whole model under torch.compile)."""
    import open_clip
    from open_clip.loss import ClipLoss, SigLipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from models.vit import VIT_SIZES

    siglip = cfg.objective.name == "siglip"
    logit_kwargs = ({"init_logit_scale": cfg.loss.siglip_init_logit_scale, "init_logit_bias": cfg.loss.siglip_init_logit_bias}
                    if siglip else {"init_logit_scale": cfg.loss.init_logit_scale})
    torch.manual_seed(cfg.seed)
    v, t = cfg.model.vision, cfg.model.text
    if model_name:
        model = open_clip.create_model(model_name, pretrained=None, device=device, output_dict=True, **logit_kwargs)
    else:
        width, depth, heads = VIT_SIZES[v.size]
        vision = CLIPVisionCfg(layers=depth, width=width, head_width=width // heads, patch_size=v.patch_size,
                               image_size=v.image_size)
        text = CLIPTextCfg(context_length=t.context_length, vocab_size=VOCAB_SIZE, width=t.width, heads=t.heads,
                           layers=t.layers)
        model = CLIP(cfg.model.embed_dim, vision, text, output_dict=True, **logit_kwargs).to(device)
    model.train()
    loss_fn = SigLipLoss(rank=0, world_size=1) if siglip else ClipLoss(cache_labels=True, rank=0, world_size=1)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(  # open_clip passes no foreach/fused flag: torch's default implementation
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.optim.weight_decay}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    batch = synthetic_batch(cfg, batch_size, device, cfg.seed)  # the same tensors as ours
    autocast, clip = autocast_for(precision, device), cfg.optim.grad_clip
    forward = model
    if compiled:
        from bench_train_engine import compile_open_clip

        forward = compile_open_clip(model)

    def step(i: int) -> None:
        with autocast:
            out = forward(batch.images, batch.tokens)
            loss = sum(loss_fn(**out, output_dict=True).values())
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type=2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return Side("open_clip" + ("+compile" if compiled else ""), step, sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- timing
def run_step(side: Side, device: torch.device, record: bool) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    side.step(side.counter)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    side.counter += 1
    if record:
        side.times.append(elapsed)
        if cuda:
            side.activation_peak = max(side.activation_peak, torch.cuda.max_memory_allocated(device) - start_bytes)


def warm_up(side: Side, steps: int, device: torch.device, before_bytes: int) -> None:
    for i in range(steps):
        t0 = time.perf_counter()
        run_step(side, device, record=False)
        if i == 0:
            side.first_step = time.perf_counter() - t0
    side.resident_bytes = allocated(device) - before_bytes  # parameters + optimizer state (+ EMA teacher)


def time_alternating(sides: list[Side], steps: int, device: torch.device) -> None:
    """Round r runs every side once; the order flips each round (A B, B A, ...) so drift hits all sides."""
    for r in range(steps):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            run_step(side, device, record=True)


def summarize(side: Side, batch: int, flops_per_sample: float, peak: float, device: torch.device) -> dict[str, Any]:
    median, mean = statistics.median(side.times), statistics.fmean(side.times)
    achieved = batch * flops_per_sample / median
    return {"samples_per_s": batch / median, "samples_per_s_mean": batch / mean, "step_time_median_s": median,
            "step_time_mean_s": mean, "step_times_s": side.times, "first_step_s": side.first_step,
            "step_time_min_s": min(side.times), "samples_per_s_best": batch / min(side.times),
            "achieved_flops_per_s": achieved,
            "mfu": achieved / peak if peak else None, "params": side.params,
            "peak_mem_bytes": side.resident_bytes + side.activation_peak if device.type == "cuda" else None}


# ----------------------------------------------------------------------------- subcommand: train
def cmd_train(args: argparse.Namespace) -> int:
    from bench_train_engine import engines, print_table, ratios
    from train.mfu import peak_flops

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    if args.model is None and args.config is None:
        args.model = "vit_b16"
    cfg = bench_config(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(args.precision, device)
    batch_search = None
    if args.batch == "auto":
        args.batch, batch_search = auto_batch(cfg, device, precision, args)
    variants = [False, True] if args.compile else [False]
    notes = []
    if "torch" in engines(args.engine):
        notes.append("ours: single process on one device; torch AdamW (train/optim.py groups) + torch "
                     "clip_grad_norm_, no DeepSpeed engine")
    if "deepspeed" in engines(args.engine):
        notes.append(f"ours[ds-z{cfg.deepspeed.zero_stage}]: the trainer's DeepSpeed engine on one rank "
                     f"(train/deepspeed_config.py, ZeRO stage {cfg.deepspeed.zero_stage}), stepped as train/trainer.py")
    if args.compile:
        notes.append("+compile: ours with torch.compile per transformer block in place (model.compile=true, "
                     "train/compile.py); open_clip with torch.compile(model) (its --torchcompile); "
                     "first step = compile + one step")

    ref_name, ref_skipped = None, None
    if args.vs == "open_clip":
        try:
            import open_clip  # noqa: F401

            ref_name = "open_clip"
        except ImportError as e:
            ref_skipped = f"--vs open_clip skipped: open_clip is not importable ({e}); pip install open_clip_torch"
            print(f"[bench] {ref_skipped}", file=sys.stderr)

    if device.type == "cuda":
        torch.cuda.empty_cache()
    sides, objective, rss_after_ours = [], None, 0
    for engine in engines(args.engine):
        for compiled in variants:
            before = allocated(device)
            side, objective = build_our_side(cfg, args.batch, device, precision, engine, compiled)
            warm_up(side, args.warmup, device, before)
            sides.append(side)
            rss_after_ours = rss_after_ours or peak_rss_bytes()  # high-water mark before any other side exists
    if ref_name:
        for compiled in variants:
            before = allocated(device)
            ref = build_open_clip_side(cfg, open_clip_model_name(args), args.batch, device, precision, compiled)
            warm_up(ref, args.warmup, device, before)
            sides.append(ref)
    if len(sides) > 1:
        notes.append("the sides alternate step by step (order reversed every round) after separate warm-ups; "
                     "samples/s from the median step time of each side; ratio a / b = samples/s of a over b")
    flops = objective.flops_per_sample()
    peak, peak_source = peak_flops(device, precision, cfg.logging.peak_flops)  # measured before timing on CPU
    time_alternating(sides, args.steps, device)

    results = {s.name: summarize(s, args.batch, flops, peak, device) for s in sides}
    ours_result = results[sides[0].name]
    ref_result = results.get(ref_name) if ref_name else None
    if device.type != "cuda":
        for name, result in results.items():
            result["peak_mem_bytes"] = rss_after_ours if name == sides[0].name else None
        notes.append(f"CPU memory: process peak RSS after the warm-up of {sides[0].name}, before any other side "
                     "was built")
    report: dict[str, Any] = {
        **ours_result, "side": sides[0].name, "sides": results, "ratios": ratios(results, ref_name),
        "ratios_best_step": ratios(results, ref_name, "samples_per_s_best"),
        "engine": args.engine, "compile": args.compile, "zero_stage": cfg.deepspeed.zero_stage,
        "ref": ref_name, "ref_skipped": ref_skipped, "ref_result": ref_result,
        "ref_samples_per_s": ref_result["samples_per_s"] if ref_result else None,
        "ratio": ours_result["samples_per_s"] / ref_result["samples_per_s"] if ref_result else None,
        "peak_mem_kind": ("cuda max_memory_allocated: params + optimizer state + activation peak of the side"
                          if device.type == "cuda" else "process peak RSS (resident set, whole process)"),
        "process_peak_rss_bytes_end": peak_rss_bytes(),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "open_clip_version": getattr(sys.modules.get("open_clip"), "__version__", None),
        "model": args.model or f"config:{args.config}", "objective": cfg.objective.name, "batch": args.batch,
        "batch_search": batch_search,
        "precision": precision, "image_size": cfg.model.vision.image_size, "warmup": args.warmup, "steps": args.steps,
        "dino_crops": ([cfg.dino.n_global_crops, cfg.dino.global_crop_size, cfg.dino.n_local_crops,
                        cfg.dino.local_crop_size] if cfg.objective.name in DINO_OBJECTIVES else None),
        "flops_per_sample": flops, "peak_flops": peak, "peak_flops_source": peak_source,
        "loadavg_start": list(load_before), "loadavg_end": list(os.getloadavg()),
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "notes": notes}
    print_table(report, [results[s.name] for s in sides], [s.name for s in sides])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"[bench] wrote {args.json}")
    return 0


def auto_batch(cfg, device: torch.device, precision: str, args: argparse.Namespace) -> tuple[int, list[dict]]:
    """`--batch auto`: the largest of --batch-candidates our eager step runs at within --mem-fraction of the GPU."""
    from bench_train_engine import search_batch

    cuda = device.type == "cuda"
    limit = int(args.mem_fraction * torch.cuda.get_device_properties(device).total_memory) if cuda else None

    def probe(batch: int) -> int:
        side, _ = build_our_side(cfg, batch, device, precision)
        if cuda:
            torch.cuda.synchronize(device)
        for _ in range(2):  # run_step resets the peak: the second step's peak includes the optimizer state
            run_step(side, device, record=False)
        return torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()

    batch, tried = search_batch(probe, args.batch_candidates, limit)
    for t in tried:
        peak = f", peak {t['peak_bytes'] / 2**30:.1f} GiB" if "peak_bytes" in t else ""
        print(f"[bench] --batch auto: batch {t['batch']}: {t['result']}{peak}", file=sys.stderr, flush=True)
    return batch, tried


def batch_arg(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def candidates_arg(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def open_clip_model_name(args: argparse.Namespace) -> Optional[str]:
    """open_clip's registered name when our architecture is exactly the preset's (no --config, no model.* edits)."""
    edited = args.config or args.image_size not in (None, 224) or any(o.startswith("model.") for o in args.overrides)
    return None if edited or args.model is None else MODELS[args.model][1]


# ----------------------------------------------------------------------------- CLI
def add_parser(commands) -> None:
    train = commands.add_parser("train", help="time one train step (ours, optionally vs open_clip)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--model", choices=sorted(MODELS), default=None,
                       help="architecture preset (default vit_b16, or the --config file's model)")
    train.add_argument("--objective", choices=TRAIN_OBJECTIVES, default="clip")
    train.add_argument("--batch", type=batch_arg, required=True,
                       help="samples (images) per step, or 'auto': the largest of --batch-candidates that fits")
    train.add_argument("--batch-candidates", type=candidates_arg,
                       default=",".join(str(b) for b in DEFAULT_BATCH_CANDIDATES),
                       help="--batch auto: comma-separated batches to try, largest first")
    train.add_argument("--mem-fraction", type=float, default=0.75,
                       help="--batch auto on a GPU: a batch whose probe peaks above this fraction of the GPU's "
                            "memory is too big (the other sides need room too)")
    train.add_argument("--steps", type=int, default=5, help="timed steps per side")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (>= 1)")
    train.add_argument("--vs", choices=("open_clip",), default=None, help="also time a reference implementation")
    train.add_argument("--compile", action="store_true",
                       help="also time each side compiled (ours per block, open_clip's whole model); eager stays")
    train.add_argument("--engine", choices=("torch", "deepspeed", "both"), default="torch",
                       help="our step: torch AdamW outside any engine, the trainer's DeepSpeed engine, or both")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="auto: bf16 autocast on CUDA, fp32 on CPU")
    train.add_argument("--image-size", type=int, default=None, help="default: the model preset's")
    train.add_argument("--local-crops", type=int, default=10, help="DINO local crops (96 px at 224, scaled)")
    train.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    train.add_argument("--peak-flops", type=float, default=None, help="override the MFU denominator (FLOP/s)")
    train.add_argument("--config", default=None, help="YAML experiment file to start from (its data paths are unused)")
    train.add_argument("--json", default=None, help="write the results as JSON here")
    train.add_argument("overrides", nargs="*", help="dotted config overrides, applied last")
    train.set_defaults(func=cmd_train, check=check_train_args)


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vs and args.objective not in ("clip", "siglip"):
        parser.error(f"--vs open_clip is not available for objective {args.objective}: open_clip has no "
                     "self-distillation training step; run it without --vs")
    if args.warmup < 1 or args.steps < 1 or (args.batch != "auto" and args.batch < 1):
        parser.error("--warmup, --steps and --batch must be >= 1 (warm-up creates the optimizer state)")

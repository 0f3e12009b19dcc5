#!/usr/bin/env python
"""`python launch/bench.py vlm`: one stage-2 training step of the VLM, ours vs plain transformers, in one process.

    python launch/bench.py vlm --llm tiny-llama --vision tiny --batch 4 --text-tokens 32 --json out.json
    python launch/bench.py vlm --llm smollm2-135m-instruct --vision tiny --batch 4 --text-tokens 64 --steps 4
    python launch/bench.py vlm --llm tiny-llama --vision tiny --engine deepspeed --zero-stage 3
    python launch/bench.py vlm --llm llama-1b --vision vitb16 --dtype bf16 --device cuda --batch 8   (a GPU)

Both sides start from the same weights (the Llava model our objective builds, deep-copied before anything runs)
and see the same fixed synthetic batch: random pixels, right-padded random token ids with exactly
`image_seq_length` image tokens per sample, labels -100 on the prompt half (the image tokens included).
  ours   VLMObjective.compute_loss (LlavaTrainingStep) forward, backward, gradient clipping, torch AdamW from
         train/optim.py's build_adamw over param_groups; or, with --engine deepspeed, the trainer's calls on a
         DeepSpeed engine built from train/deepspeed_config.py (engine.backward, engine.step: clipping inside).
  plain  LlavaForConditionalGeneration(input_ids, pixel_values, attention_mask, labels).loss.backward(),
         clip_grad_norm_, torch AdamW as the HF Trainer builds it by default (fused; its decay groups).
Before timing, one forward + backward of each on the initial weights: the losses and gradients must agree.
After separate warm-ups the sides alternate A B B A ...; figures are medians of each side's step times.
MFU: models/vlm.py's vlm_step_flops on the batch's token counts over train/mfu.py's peak. bf16 = autocast
around the forward with fp32 weights, as the trainer runs on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import _bootstrap  # noqa: F401  (repo root on sys.path)
import torch

TOWERS = {  # name -> ViTConfig kwargs (built into a temp export); pre-norm: the CLIP-style tower LLaVA uses
    "tiny": dict(size="micro", patch_size=8, image_size=64),  # 8 x 8 = 64 image tokens
    "vitb16": dict(size="base", patch_size=16, image_size=384),  # 24 x 24 = 576 image tokens, LLaVA-1.5's count
}
TORCH_LINEAR = torch.nn.functional.linear  # ZeRO-3 replaces it process-wide (its memory-efficient linear)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=4096)  # 1.10B parameters


@dataclass
class Side:
    """One contender: a step function (returns the detached loss) and what it measured."""
    name: str
    step: Callable[[], torch.Tensor]
    resident_bytes: int = 0  # params + grads + optimizer state of this side on the GPU after its warm-up
    times: list[float] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)  # every step's, warm-up included
    activation_peak: int = 0  # max over timed steps of (max allocated - allocated at the step's start)
    max_allocated: int = 0  # max over timed steps of max_memory_allocated (the other side's state included)


# ----------------------------------------------------------------------------- model and batch
def write_tower(name_or_path: str, folder: Path) -> str:
    """An encoder export: the given folder, or a randomly initialised named tower written to `folder`."""
    if name_or_path not in TOWERS:
        if not (Path(name_or_path) / "config.json").is_file():
            raise FileNotFoundError(f"--vision {name_or_path}: not {' / '.join(TOWERS)} and not an encoder export "
                                    "folder (launch/pretrain.py writes them under RUN/export/step_*)")
        return name_or_path
    from models.export import save_export
    from models.vit import ViTConfig, VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = VisionTransformer(ViTConfig(**TOWERS[name_or_path], pre_norm=True, init="scaled"))
    return str(save_export(folder, vit, "vit", {"vision": asdict(vit.cfg), "image_mean": [0.48145466, 0.4578275,
                           0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))


def write_llama_1b(folder: Path, device: torch.device) -> str:
    """A ~1.1B Llama with random weights (stored bf16) and the tiny Llama-style tokenizer: the vocabulary stays 32000,
    the tokenizer's ids are a subset of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.llm import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("metaspace")
    config = LlamaConfig(**LLAMA_1B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # initialised on the device: seconds, not minutes
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def build_objective(args: argparse.Namespace, scratch: Path, device: torch.device):
    """Our VLM objective (the trainer's: build_llava, set_trainable, LlavaTrainingStep) on the CPU."""
    from train.objectives.vlm import VLMObjective
    from train.vlm_config import VLMConfig

    cfg = VLMConfig()
    cfg.model.vision = write_tower(args.vision, scratch / "tower")
    cfg.model.llm = write_llama_1b(scratch / "llama-1b", device) if args.llm == "llama-1b" else args.llm
    cfg.model.train = args.train
    cfg.optim.lr, cfg.optim.grad_clip, cfg.optim.weight_decay = args.lr, args.grad_clip, 0.0  # LLaVA: no decay
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = args.zero_stage, args.dtype
    cfg.logging.wandb = "disabled"
    torch.manual_seed(cfg.seed)  # the projector's init draws from the global generator
    return VLMObjective(cfg, steps_per_epoch=1000, total_steps=1000), cfg


def synthetic_batch(objective, batch: int, text_tokens: int, device: torch.device, seed: int = 0):
    """Per sample: [prompt text][image tokens][prompt text][answer][pad]; text lengths spread over
    [3/4 text_tokens, text_tokens] so padding (and the attention mask) is real. Labels = ids on the answer only."""
    from data.vlm_data import IGNORE_INDEX, VLMBatch

    config, tokenizer = objective.llava.config, objective.processor.tokenizer
    image_id, pad_id, n_image = config.image_token_id, tokenizer.pad_token_id, config.image_seq_length
    vocab = config.text_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    lengths = [text_tokens - (i * (text_tokens // 4)) // max(batch - 1, 1) for i in range(batch)]
    longest = n_image + max(lengths)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, longest, dtype=torch.long)
    safe = next(i for i in range(vocab) if i not in (image_id, pad_id))
    for row, n_text in enumerate(lengths):
        text = torch.randint(0, vocab, (n_text,), generator=gen)
        text[(text == image_id) | (text == pad_id)] = safe
        before, prompt = n_text // 4, n_text // 2  # text tokens ahead of the image; prompt text in all
        ids = torch.cat([text[:before], torch.full((n_image,), image_id), text[before:]])
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        answer = n_image + prompt
        labels[row, answer: len(ids)] = ids[answer:]
    mean = torch.tensor(objective.processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(objective.processor.image_processor.image_std).view(1, 3, 1, 1)
    size = config.vision_config.image_size
    pixels = (torch.rand(batch, 3, size, size, generator=gen) - mean) / std
    out = VLMBatch([f"synthetic-{i}" for i in range(batch)], input_ids, labels, attention_mask, pixels,
                   torch.ones(batch, dtype=torch.bool))
    return out.to(device)


def batch_counts(batch) -> dict[str, float]:
    lengths = batch.attention_mask.sum(1).double()  # (B,) non-pad tokens, image tokens included
    return {"count/input_tokens": float(lengths.sum()), "count/token_sq": float((lengths * lengths).sum()),
            "count/samples": float(len(batch)), "count/tokens": float((batch.labels[:, 1:] != -100).sum())}


# ----------------------------------------------------------------------------- the two steps
def autocast_for(dtype: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def plain_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                 labels=batch.labels).loss


def check_parity(objective, plain, batch, autocast) -> dict[str, float]:
    """One forward + backward of each side on the initial weights: loss and gradient differences."""
    with autocast:
        ours = objective.compute_loss(objective.student, batch, 0)["loss"]
    ours.backward()
    with autocast:
        ref = plain_loss(plain, batch)
    ref.backward()
    worst, scale = 0.0, 0.0
    for a, b in zip(objective.llava.parameters(), plain.parameters()):
        if a.grad is not None or b.grad is not None:
            worst = max(worst, float((a.grad - b.grad).abs().max()))
            scale = max(scale, float(b.grad.abs().max()))
    objective.llava.zero_grad(set_to_none=True)
    plain.zero_grad(set_to_none=True)
    ours, ref = ours.item(), ref.item()
    return {"loss_ours": ours, "loss_plain": ref, "loss_abs_diff": abs(ours - ref),
            "grad_max_abs_diff": worst, "grad_max_abs": scale, "grad_max_rel_diff": worst / scale if scale else 0.0}


def build_our_side(objective, cfg, batch, args, autocast) -> Side:
    from train.optim import build_adamw, param_groups

    groups = param_groups(objective.student, cfg.optim.weight_decay, objective.no_weight_decay_names(),
                          objective.group_of)
    optimizer = build_adamw(groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps)
    if args.engine == "deepspeed":
        import deepspeed

        from train.deepspeed_config import build_deepspeed_config

        ds_config = build_deepspeed_config(cfg, len(batch), 1, 1, objective)
        engine, _, _, _ = deepspeed.initialize(model=objective.student, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
        linear = torch.nn.functional.linear  # ZeRO-3: deepspeed's zero3_linear_wrap, as in the trainer's process

        def step() -> torch.Tensor:  # the trainer's calls, one micro-batch per optimizer step
            torch.nn.functional.linear = linear
            with autocast:
                loss = objective.compute_loss(engine, batch, 0)["loss"]
            engine.backward(loss)
            engine.step()
            return loss.detach()

        return Side(f"ours (deepspeed zero-{args.zero_stage})", step)
    trained, clip = [p for g in groups for p in g["params"]], cfg.optim.grad_clip

    def step() -> torch.Tensor:
        with autocast:
            loss = objective.compute_loss(objective.student, batch, 0)["loss"]
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Side("ours", step)


def build_plain_side(model, cfg, batch, autocast) -> Side:
    """The HF Trainer's step: its decay groups (no decay for biases and norms), torch AdamW fused (its default optim
    `adamw_torch_fused` for torch >= 2.8), accelerate's clip_grad_norm_ = torch's, zero_grad(set_to_none)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": cfg.optim.weight_decay},
                                   {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                                  lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    clip = cfg.optim.grad_clip

    def step() -> torch.Tensor:
        torch.nn.functional.linear = TORCH_LINEAR  # not DeepSpeed's, when ours runs ZeRO-3 in this process
        with autocast:
            loss = plain_loss(model, batch)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return Side("plain transformers", step)


# ----------------------------------------------------------------------------- timing
def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_step(side: Side, device: torch.device, record: bool) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    side.losses.append(side.step())
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if record:
        side.times.append(elapsed)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            side.activation_peak = max(side.activation_peak, peak - start_bytes)
            side.max_allocated = max(side.max_allocated, peak)


def summarize(side: Side, counts: dict[str, float], flops: float, peak: float, device: torch.device) -> dict[str, Any]:
    median, mean = statistics.median(side.times), statistics.fmean(side.times)
    achieved = flops / median
    return {"name": side.name, "step_time_median_s": median, "step_time_mean_s": mean,
            "step_time_min_s": min(side.times), "step_times_s": side.times,
            "samples_per_s": counts["count/samples"] / median, "tokens_per_s": counts["count/input_tokens"] / median,
            "achieved_flops_per_s": achieved, "mfu": achieved / peak if peak else None,
            "peak_mem_bytes": side.resident_bytes + side.activation_peak if device.type == "cuda" else None,
            "max_memory_allocated_bytes": side.max_allocated if device.type == "cuda" else None,
            "losses": [float(x) for x in side.losses]}


# ----------------------------------------------------------------------------- subcommand: vlm
def cmd_vlm(args: argparse.Namespace) -> int:
    from models.vlm import vlm_step_flops
    from train.mfu import peak_flops

    started, load_before = datetime.now(timezone.utc).isoformat(timespec="seconds"), os.getloadavg()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch here; run with --device cpu")
    notes = []
    if args.engine == "deepspeed":  # a world of one (gloo on CPU, DS_ACCELERATOR=cpu), as a 1-rank trainer run
        from train.distributed import init_distributed

        init_distributed()
        notes.append(f"ours through a DeepSpeed engine (ZeRO-{args.zero_stage}, world of 1, the trainer's config: "
                     "fp32 parameters, clipping inside engine.step); plain transformers without an engine, with torch's "
                     "F.linear (ZeRO-3 swaps in its own process-wide)")
        if args.zero_stage == 3 and device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE":
            notes.append("CPU + ZeRO-3: after deepspeed.initialize every small op in the process is slower (libgomp "
                         "stops spinning: 2 threads act like 1), the plain side's too; OMP_WAIT_POLICY=ACTIVE removes it")
    if args.threads:  # after init_distributed, which sets its own default
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="clipdino_bench_vlm_") as scratch:
        objective, cfg = build_objective(args, Path(scratch), device)
    plain = copy.deepcopy(objective.llava).train()  # identical weights, trainable flags and config
    objective.student.train()
    sizes, parts, config = objective.sizes, objective.parts, objective.llava.config

    before = allocated(device)
    objective.to(device)
    params_ours = allocated(device) - before
    plain.to(device)
    params_plain = allocated(device) - before - params_ours
    batch = synthetic_batch(objective, args.batch, args.text_tokens, device)
    counts = batch_counts(batch)
    autocast = autocast_for(args.dtype, device)
    parity = check_parity(objective, plain, batch, autocast)
    print(f"[bench vlm] parity on the initial weights: loss ours {parity['loss_ours']:.6f}, plain "
          f"{parity['loss_plain']:.6f}, |diff| {parity['loss_abs_diff']:.2e}; gradients max |diff| "
          f"{parity['grad_max_abs_diff']:.2e} (relative {parity['grad_max_rel_diff']:.2e})", flush=True)

    sides = []
    for build, params in ((lambda: build_our_side(objective, cfg, batch, args, autocast), params_ours),
                          (lambda: build_plain_side(plain, cfg, batch, autocast), params_plain)):
        start = allocated(device)
        side = build()
        for _ in range(args.warmup):
            run_step(side, device, record=False)
        side.resident_bytes = params + allocated(device) - start  # + grads (DeepSpeed keeps them) + optimizer state
        sides.append(side)
    flops = vlm_step_flops(config, sizes, parts, counts)
    peak, peak_source = peak_flops(device, args.dtype, args.peak_flops)  # measured before timing on CPU
    for r in range(args.steps):  # A B, B A, ...: drift hits both sides alike
        for side in (sides if r % 2 == 0 else sides[::-1]):
            run_step(side, device, record=True)

    ours, ref = (summarize(s, counts, flops, peak, device) for s in sides)
    trajectory = max(abs(a - b) for a, b in zip(ours["losses"], ref["losses"]))
    if device.type != "cuda":
        notes.append("CPU memory: per-side peaks are not separable in one process; peak_rss_bytes is the whole "
                     "process's peak resident set (both models, both optimizers)")
    notes.append("MFU of both sides from the same FLOPs (vlm_step_flops: the LM head at supervised positions, as ours "
                 "runs it); plain transformers runs the head at all B x T positions, more work than counted")
    notes.append("tokens/s counts every non-pad token (image tokens included); loss_trajectory_max_abs_diff: the "
                 "largest |loss ours - loss plain| at the same step index over warm-up and timed steps")
    report: dict[str, Any] = {
        "ours": ours, "plain": ref, "ratio": ours["samples_per_s"] / ref["samples_per_s"],
        "ratio_min": ref["step_time_min_s"] / ours["step_time_min_s"], "parity": parity,
        "loss_trajectory_max_abs_diff": trajectory,
        "llm": args.llm, "vision": args.vision, "train": sorted(parts), "engine": args.engine,
        "zero_stage": args.zero_stage if args.engine == "deepspeed" else None, "dtype": args.dtype,
        "batch": args.batch, "text_tokens": args.text_tokens, "image_tokens": config.image_seq_length,
        "sequence_length": int(batch.input_ids.shape[1]), "counts": counts, "sizes": sizes,
        "lr": args.lr, "grad_clip": args.grad_clip, "warmup": args.warmup, "steps": args.steps,
        "flops_per_step": flops, "peak_flops": peak, "peak_flops_source": peak_source,
        "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "versions": versions(args.engine),
        "git": provenance(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "DS_ACCELERATOR")},
        "loadavg_start": list(load_before), "loadavg_end": list(os.getloadavg()), "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "notes": notes}
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"[bench vlm] wrote {args.json}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def provenance() -> dict[str, Any]:
    """The commit measured, and which of the files this step runs through differ from it."""
    import subprocess

    files = ["models/vlm.py", "models/llm.py", "train/objectives/vlm.py", "train/optim.py", "train/deepspeed_config.py"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], capture_output=True, text=True,
                               check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")
        return {"commit": head, "modified": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": None}


def versions(engine: str) -> dict[str, Optional[str]]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "deepspeed": None, "cuda": torch.version.cuda}
    if engine == "deepspeed":
        out["deepspeed"] = sys.modules["deepspeed"].__version__
    return out


def print_table(r: dict[str, Any]) -> None:
    def mem(v: Optional[int]) -> str:
        return "-" if v is None else f"{v / 2**30:.2f} GiB"

    s, c = r["sizes"], r["counts"]
    print(f"\nVLM stage-2 step: {r['llm']} + {r['vision']} tower (LLM {s['llm'] / 1e6:.1f}M, tower "
          f"{s['vision'] / 1e6:.1f}M, projector {s['projector'] / 1e6:.2f}M; {s['trainable'] / 1e6:.1f}M trained: "
          f"{','.join(r['train'])}), {r['dtype']}, engine {r['engine']}"
          + (f" ZeRO-{r['zero_stage']}" if r["zero_stage"] is not None else ""))
    print(f"batch {r['batch']} x (image {r['image_tokens']} + text <= {r['text_tokens']}) tokens, padded to "
          f"{r['sequence_length']}: {c['count/input_tokens']:.0f} non-pad tokens, {c['count/tokens']:.0f} supervised; "
          f"{r['flops_per_step'] / 1e9:.2f} GFLOP/step, peak {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_flops_source']})")
    print(f"{r['device']} ({r['device_name']}, {r['threads']} threads of {r['cpu_count']} CPUs), "
          + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + f", {r['started_at']}, commit "
          f"{(r['git']['commit'] or '?')[:8]}" + (f" + edits to {', '.join(r['git']['modified'])}" if r["git"]["modified"]
                                                  else ""))
    print(f"{r['warmup']} warm-up + {r['steps']} timed steps per side (A B B A ...)\n")
    rows = [("step time median (s)", lambda x: f"{x['step_time_median_s']:.4f}"),
            ("step time mean (s)", lambda x: f"{x['step_time_mean_s']:.4f}"),
            ("step time min (s)", lambda x: f"{x['step_time_min_s']:.4f}"),
            ("samples/s", lambda x: f"{x['samples_per_s']:.2f}"),
            ("tokens/s", lambda x: f"{x['tokens_per_s']:.0f}"),
            ("achieved TFLOP/s", lambda x: f"{x['achieved_flops_per_s'] / 1e12:.4f}"),
            ("MFU", lambda x: "-" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"),
            ("peak memory (resident + activations)", lambda x: mem(x["peak_mem_bytes"])),
            ("max_memory_allocated in its steps", lambda x: mem(x["max_memory_allocated_bytes"]))]
    ours, ref = r["ours"], r["plain"]
    print(f"| | {ours['name']} | {ref['name']} |\n|---|---|---|")
    for label, fmt in rows:
        print(f"| {label} | {fmt(ours)} | {fmt(ref)} |")
    p = r["parity"]
    print(f"\nratio ours / plain (samples/s, medians): {r['ratio']:.3f}  (target >= 0.95); "
          f"from the fastest steps: {r['ratio_min']:.3f}")
    print(f"loss check (initial weights): ours {p['loss_ours']:.6f}, plain {p['loss_plain']:.6f}, |diff| "
          f"{p['loss_abs_diff']:.2e}; gradient max relative diff {p['grad_max_rel_diff']:.2e}; "
          f"loss trajectories max |diff| {r['loss_trajectory_max_abs_diff']:.2e}")
    if r["device"] == "cpu":
        print(f"process peak RSS: {mem(r['peak_rss_bytes'])}")
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"load average start {r['loadavg_start'][0]:.2f}, end {r['loadavg_end'][0]:.2f}")


# ----------------------------------------------------------------------------- CLI
def add_parser(commands) -> None:
    p = commands.add_parser("vlm", help="time a VLM stage-2 step, ours vs plain transformers",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default="tiny-llama",
                   help="tiny-llama | tiny-qwen2 | smollm2-135m-instruct | llama-1b (random ~1.1B Llama) | FOLDER")
    p.add_argument("--vision", default="tiny", help="tiny (micro ViT, 64 px /8) | vitb16 (ViT-B/16, 384 px: 576 "
                   "image tokens) | EXPORT folder")
    p.add_argument("--batch", type=int, default=4, help="samples (each with one image) per step")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens of the longest sample beside its "
                   "image tokens (the others: down to 3/4 of it, right-padded)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (>= 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", default="projector,llm", help="model.train: projector | projector,llm[,vision]")
    p.add_argument("--engine", choices=("torch", "deepspeed"), default="torch", help="how OUR side steps")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3, help="with --engine deepspeed")
    p.add_argument("--lr", type=float, default=2e-5, help="constant LR of both sides (LLaVA-1.5 stage 2's peak)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="both sides (HF Trainer's max_grad_norm)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-flops", type=float, default=None, help="override the MFU denominator (FLOP/s)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_vlm, check=check_vlm_args)


def check_vlm_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup < 1 or args.steps < 1 or args.batch < 1 or args.text_tokens < 4:
        parser.error("--warmup, --steps and --batch must be >= 1 and --text-tokens >= 4")
    if args.engine == "deepspeed" and importlib_missing("deepspeed"):
        parser.error("--engine deepspeed: deepspeed is not importable here (pip install deepspeed), or use "
                     "--engine torch")


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None

#!/usr/bin/env python
"""GPU-hours of the paper's runs, derived from analytic FLOPs at an ASSUMED MFU. Nothing here is measured on a GPU.

    python benchmarks/gpu_hours_estimate.py [--mfu 0.4] [--text-tokens 32 128 512] [--llm-config VICUNA_DIR]

Pretraining: the training FLOPs per sample are the objectives' own `flops_per_sample()` (models/flops.py: matmuls,
3x forward for what trains, 1x for forward-only parts), from models built out of the shipped
launch/configs/pretrain/vitb16_*_datacomp10m.yaml on the meta device (no weights, no data); samples = steps x
global batch with the trainer's own `resolve_steps`. The loader column divides the samples/s a GPU would consume
at that MFU by the CPU loader's measured images/s per worker process (benchmarks/results/data_cpu_{clip,dino}_t2.json:
a 2-core VM, 320 px synthetic JPEGs; DataComp images and a cluster's CPUs differ).

VLM: models/vlm.py `vlm_step_flops` for one sample of the ViT-B/16 tower's 196 image tokens (224 px / 16) + T text
tokens, every text token supervised (the LM head is ~2% of a token's FLOPs), tower frozen; stage 1 trains the
projector (the frozen LLM still back-propagates: 2x its forward), stage 2 projector + LLM (3x). The LLM is Vicuna-7B
v1.5's architecture (its config.json: Llama, hidden 4096, 32 layers, MLP 11008, vocab 32000, untied head) unless
--llm-config points at a local model folder. T is an assumption: the real counts are in metrics.jsonl
(count/input_tokens, count/tokens). Samples: one epoch of blip_laion_cc_sbu_558k / llava_v1_5_mix665k, sizes from
the file names (558K, 665K).

GPU-hours = samples x FLOPs per sample / (peak x MFU) / 3600, peak = train/mfu.py's dense bf16 number for H100/H200.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "launch", ROOT):  # launch/ for bench_train's throwaway tokenizer
    sys.path.insert(0, str(path))

import torch  # noqa: E402

PRETRAIN = ("clip", "siglip", "dino", "hybrid")  # clip_frozen_text needs ROBERTA_DIR's weights: not built here
LOADER_TASK = {"clip": "clip", "siglip": "clip", "dino": "dino", "hybrid": "dino"}  # hybrid loads DINO's crops
VLM_STAGES = (("stage 1", "llava15_vicuna7b_stage1.yaml", {"projector"}, 558_000),
              ("stage 2", "llava15_vicuna7b_stage2.yaml", {"projector", "llm"}, 665_000))
VOCAB = 49408  # the caption tokenizer's size in base_vitb16_datacomp10m.yaml's command (parameter counts only)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def peak_bf16() -> float:
    from train.mfu import GPU_PEAKS

    if GPU_PEAKS["H100"][0] != GPU_PEAKS["H200"][0]:
        raise SystemExit("train/mfu.py gives H100 and H200 different bf16 peaks: pass --peak")
    return GPU_PEAKS["H100"][0]


def loader_rates() -> dict[str, float]:
    """Measured CPU-loader images/s per worker process (2 workers), by task."""
    rates = {}
    for task in ("clip", "dino"):
        data = json.loads((ROOT / f"benchmarks/results/data_cpu_{task}_t2.json").read_text())
        rates[task] = data["images_per_s_per_thread"]
    return rates


def saves(steps: int, checkpoint) -> int:
    """Checkpoint + export writes of a run (train/trainer.py: every `every` steps, and at the end)."""
    periodic = steps // checkpoint.every if checkpoint.every else 0
    return periodic + int(checkpoint.at_end and (not checkpoint.every or steps % checkpoint.every != 0))


def pretrain_rows(mfu: float, peak: float) -> list[dict]:
    from bench_train import throwaway_tokenizer
    from train.config_loader import load_config
    from train.objectives.registry import build_objective
    from train.trainer import resolve_steps

    rates, rows = loader_rates(), []
    for name in PRETRAIN:
        path = f"launch/configs/pretrain/vitb16_{name}_datacomp10m.yaml"
        cfg = load_config(ROOT / path, [f"model.text.vocab_size={VOCAB}"])  # the tokenizer's size, not the throwaway's
        steps, _, per_epoch = resolve_steps(cfg, cfg.data.samples_per_epoch)
        with throwaway_tokenizer(cfg), torch.device("meta"):  # shapes only
            objective = build_objective(cfg, per_epoch, steps)
        flops = objective.flops_per_sample()
        trained = sum(p.numel() for p in objective.student.parameters() if p.requires_grad)
        samples = steps * cfg.schedule.global_batch
        per_gpu = peak * mfu / flops  # samples/s one GPU consumes at this MFU
        rows.append({"config": Path(path).name, "trained_params": trained, "flops_per_sample": flops, "steps": steps,
                     "samples": samples, "gpu_hours": samples * flops / (peak * mfu) / 3600,
                     "samples_per_s_per_gpu": per_gpu, "saves": saves(steps, cfg.checkpoint),
                     "loader_procs_per_gpu": math.ceil(per_gpu / rates[LOADER_TASK[name]]),
                     "data_workers": cfg.data.workers})
    return rows


def llava_for_flops(llm_config: str | None, image_size: int, patch: int):
    """(LlavaConfig, sizes) of tower + projector + LLM, built on the meta device as models/vlm.py assembles them."""
    from transformers import AutoConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from models.convert.to_hf import hf_vision_from_vit
    from models.vit import ViTConfig, VisionTransformer
    from models.vlm import describe

    with torch.device("meta"):
        vit = VisionTransformer(ViTConfig(size="base", patch_size=patch, image_size=image_size, pre_norm=True))
    vision_config, _ = hf_vision_from_vit(vit.to_empty(device="cpu"), purpose="llava")
    text_config = AutoConfig.from_pretrained(llm_config) if llm_config else LlamaConfig(**VICUNA_7B)
    grid = image_size // patch
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_seq_length=grid * grid,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return config, describe(model)


def vlm_rows(mfu: float, peak: float, text_tokens: list[int], llm_config: str | None) -> list[dict]:
    from models.vlm import vlm_step_flops
    from train.config_loader import load_config

    base = load_config(ROOT / "launch/configs/pretrain/base_vitb16_datacomp10m.yaml")  # the encoders' tower
    config, sizes = llava_for_flops(llm_config, base.model.vision.image_size, base.model.vision.patch_size)
    image = config.image_seq_length
    from train.trainer import resolve_steps
    from train.vlm_config import VLM_CHOICES, VLMConfig

    rows = []
    for stage, name, parts, samples in VLM_STAGES:
        cfg = load_config(ROOT / "launch/configs/vlm" / name, cls=VLMConfig, choices=VLM_CHOICES)
        steps = resolve_steps(cfg, samples)[0]
        for t in text_tokens:
            counts = {"count/input_tokens": image + t, "count/token_sq": (image + t) ** 2, "count/samples": 1,
                      "count/tokens": t}
            flops = vlm_step_flops(config, sizes, parts, counts)
            rows.append({"stage": stage, "config": name, "trains": "+".join(sorted(parts)), "image_tokens": image,
                         "text_tokens": t, "flops_per_sample": flops, "samples": samples, "steps": steps,
                         "saves": saves(steps, cfg.checkpoint),
                         "gpu_hours": samples * flops / (peak * mfu) / 3600,
                         "samples_per_s_per_gpu": peak * mfu / flops})
    return rows, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.40, help="ASSUMED model FLOPs utilisation (default 0.40)")
    parser.add_argument("--peak", type=float, default=None,
                        help="peak FLOP/s per GPU (default: train/mfu.py's H100/H200 bf16)")
    parser.add_argument("--text-tokens", type=int, nargs="+", default=[32, 128, 512],
                        help="ASSUMED text tokens per VLM sample (default 32 128 512)")
    parser.add_argument("--llm-config", default=None,
                        help="a local HF model folder whose config.json replaces Vicuna-7B's")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    peak = args.peak or peak_bf16()
    print(f"ASSUMED MFU {args.mfu:.0%} of a {peak / 1e12:.0f} TFLOP/s bf16 dense peak (train/mfu.py: H100 / H200). "
          "Derived from analytic FLOPs, not measured on a GPU.")

    pre = pretrain_rows(args.mfu, peak)
    print("\nPretraining, ViT-B/16 224 px, DataComp 10M x 20 epochs (launch/configs/pretrain/):")
    print(f"{'config':<34} {'trained':>8} {'GFLOP/':>8} {'steps':>7} {'samples':>11} {'GPU-h':>7} {'samples/s':>10} "
          f"{'saves':>6} {'loader procs/GPU':>16}")
    print(f"{'':<34} {'params':>8} {'sample':>8} {'':>7} {'':>11} {'':>7} {'per GPU':>10} {'':>6} "
          f"{'(data.workers)':>16}")
    for r in pre:
        print(f"{r['config']:<34} {r['trained_params'] / 1e6:>7.1f}M {r['flops_per_sample'] / 1e9:>8.1f} "
              f"{r['steps']:>7} {r['samples']:>11,} {r['gpu_hours']:>7.1f} {r['samples_per_s_per_gpu']:>10.0f} "
              f"{r['saves']:>6} {r['loader_procs_per_gpu']:>9} ({r['data_workers']})")

    vlm, sizes = vlm_rows(args.mfu, peak, args.text_tokens, args.llm_config)
    llm = "Vicuna-7B v1.5 architecture" if not args.llm_config else args.llm_config
    print(f"\nVLM (LLaVA-1.5 recipe, {llm}, ViT-B/16 224 px tower; parameters: LLM {sizes['llm'] / 1e9:.2f}B, "
          f"tower {sizes['vision'] / 1e6:.1f}M, projector {sizes['projector'] / 1e6:.1f}M), one epoch per stage:")
    print(f"{'stage':<8} {'trains':<14} {'tokens (img+text)':>17} {'TFLOP/sample':>12} {'samples':>9} {'steps':>6} "
          f"{'saves':>5} {'GPU-h':>7} {'samples/s per GPU':>17}")
    for r in vlm:
        print(f"{r['stage']:<8} {r['trains']:<14} {r['image_tokens']:>9} + {r['text_tokens']:<5} "
              f"{r['flops_per_sample'] / 1e12:>12.2f} {r['samples']:>9,} {r['steps']:>6} {r['saves']:>5} "
              f"{r['gpu_hours']:>7.1f} {r['samples_per_s_per_gpu']:>17.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mfu_assumed": args.mfu, "peak_flops": peak, "pretrain": pre,
                                               "vlm": vlm, "vlm_sizes": sizes}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())

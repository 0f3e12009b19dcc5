#!/usr/bin/env bash
# A LLaVA-1.5 stage-2 training step on one GPU, ours vs plain transformers (launch/bench_vlm.py), in one process
# per run: a ~1.1B Llama (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 32000, random
# weights) + a ViT-B/16 tower at 384 px (576 image tokens per sample, LLaVA-1.5's count; random weights) + the
# mlp2x_gelu projector; projector and LLM trained, tower frozen; batch 8 x (576 image + up to 128 text tokens),
# bf16 autocast over fp32 weights (as the trainer runs on a GPU), AdamW fused on both sides.
#   ours : VLMObjective.compute_loss (LlavaTrainingStep: the LM head only at supervised positions) + backward +
#          clip + torch AdamW (train/optim.py)          -> benchmarks/results/bench_vlm_gpu_llama1b_vitb16.{txt,json}
#   ours through the trainer's DeepSpeed engine, ZeRO-3, a world of 1 (only if deepspeed imports)
#                                                       -> benchmarks/results/bench_vlm_gpu_llama1b_vitb16_zero3.{txt,json}
#   plain: LlavaForConditionalGeneration(..., labels=...).loss.backward() + clip + AdamW (HF Trainer's defaults).
# Reported per side: median step time, samples/s, tokens/s (non-pad, image tokens included), MFU (vlm_step_flops over
# the H200's bf16 datasheet peak), peak memory (resident params + grads + optimizer state + activation peak, and raw
# max_memory_allocated), the ratio ours / plain (target >= 0.95), the loss/gradient agreement, load, versions.
# Expected time: ~1-2 min of set-up (random 1.1B weights written once to a temp folder and read back) + seconds of
# steps, per run; both runs well under 10 minutes.
#   bash benchmarks/gpu_vlm_step.sh            (PYTHON=... to choose the interpreter, BATCH=... TEXT=... to vary)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
OUT=benchmarks/results
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
ARGS=(--llm llama-1b --vision vitb16 --dtype bf16 --device cuda --batch "${BATCH:-8}" --text-tokens "${TEXT:-128}"
      --steps 10 --warmup 3)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$PY" launch/bench.py vlm "${ARGS[@]}" --json "$OUT/bench_vlm_gpu_llama1b_vitb16.json" \
    | tee "$OUT/bench_vlm_gpu_llama1b_vitb16.txt"

if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    "$PY" launch/bench.py vlm "${ARGS[@]}" --engine deepspeed --zero-stage 3 \
        --json "$OUT/bench_vlm_gpu_llama1b_vitb16_zero3.json" | tee "$OUT/bench_vlm_gpu_llama1b_vitb16_zero3.txt"
else
    echo "deepspeed does not import here: the ZeRO-3 variant is skipped" | tee "$OUT/bench_vlm_gpu_llama1b_vitb16_zero3.txt"
fi

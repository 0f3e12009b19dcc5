"""The interface every pretraining objective implements; the trainer knows nothing else.

An objective owns a `student` (the module DeepSpeed trains), its loss modules, and any extra
state (an EMA teacher, a DINO centre). Each step the trainer calls

    out = objective.compute_loss(engine, batch, step)   # engine: the DeepSpeed-wrapped student
    engine.backward(out["loss"]); engine.step()
    objective.after_step(step)                          # EMA update, ...

`compute_loss` returns "loss" plus any "loss/..." and "metric/..." scalars to log.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn as nn

from data.loader import Batch, SampleProcessor
from train.optim import cosine  # noqa: F401  (schedules of objectives)


class Objective(ABC):
    name: str = ""
    student: nn.Module
    checkpoint_frozen: bool = True  # False: checkpoints leave out frozen parameters (rebuilt from the config)

    def __init__(self, cfg, steps_per_epoch: int, total_steps: int):
        self.cfg = cfg
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = max(int(total_steps), 1)

    @abstractmethod
    def compute_loss(self, student: Callable, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Forward the batch through `student` (the engine) and return the loss dict."""

    @abstractmethod
    def data_processor(self) -> SampleProcessor:
        """How raw samples become tensors for this objective (views, crops, tokens)."""

    @abstractmethod
    def flops_per_sample(self) -> float:
        """Training FLOPs per image (forward + backward of trained parts, forward of the rest)."""

    @abstractmethod
    def export(self) -> tuple[nn.Module, str, dict[str, Any]]:
        """(module, kind, config) written to export/step_NNNNNNN/: kind 'vit' or 'clip'."""

    @abstractmethod
    def vision_tower(self) -> nn.Module:
        """The student's VisionTransformer (what `model.init_from` initialises)."""

    # ------------------------------------------------------------------ data: the objective owns it
    @classmethod
    def prepare_data(cls, cfg) -> None:
        """Rank 0, before anything else: create the embedded default's data if asked and missing."""
        if cfg.data.generate_synthetic:
            from data.prepare import ensure_synthetic_data

            ensure_synthetic_data(cfg)

    @classmethod
    def count_samples(cls, cfg) -> int:
        """Rank 0: samples in one epoch (when data.samples_per_epoch is not set)."""
        from data.shards import count_samples, expand_shards

        return count_samples(expand_shards(cfg.data.train))

    def build_loader(self, micro: int, accum: int, rank: int, world: int, device_type: str):
        """This rank's endless batch stream with state_dict / load_state_dict / skipped (collective)."""
        from data.build import build_train_loader
        from data.shards import expand_shards
        from train.distributed import run_on_main

        shards = run_on_main(expand_shards, self.cfg.data.train)
        return build_train_loader(self.cfg, shards, self.data_processor(), micro, rank, world, device_type)

    def configure_grad_checkpointing(self) -> None:
        if self.cfg.model.vision.grad_checkpointing:
            self.student.set_grad_checkpointing(True)

    def flops_per_step(self, counts: dict[str, float], global_batch: int) -> float:
        """Training FLOPs of one optimizer step; `counts` holds the step's summed "count/..." terms."""
        return self.flops_per_sample() * global_batch

    def write_export(self, engine, out_dir, meta: dict[str, Any], zero_stage: int, is_main: bool) -> None:
        """Write export/step_NNNNNNN/ (every rank calls this: gathering ZeRO-3 weights is collective)."""
        import contextlib

        from models.export import save_export

        module, kind, export_cfg = self.export()
        gather = contextlib.nullcontext()
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if is_main:
                save_export(out_dir, module, kind, export_cfg, meta)

    def init_vision_from(self, export_dir: str) -> None:
        from models.convert.init_from import init_vision_from_export

        init_vision_from_export(self.vision_tower(), export_dir)

    def after_step(self, step: int) -> dict[str, float]:
        """Called on every rank after an optimizer step that updated the weights (EMA teacher, DINO centre)."""
        return {}

    def skip_step(self, step: int) -> None:
        """Called on every rank instead of `after_step` when a non-finite loss skipped the update."""

    def lr_scale(self, group_name: str, step: int) -> float:
        """Per-group LR multiplier. 0 holds the group: the trainer leaves it out of that optimizer step, so its
        weights and Adam state stay untouched (DINO's last-layer freeze; train/optim.py skip_held_groups)."""
        return 1.0

    def no_weight_decay_names(self) -> set[str]:
        fn = getattr(self.student, "no_weight_decay", None)
        return set(fn()) if fn else set()

    def group_of(self, param_name: str) -> str:
        """Optimizer group name for a parameter beyond decay/no-decay ('' = the default groups)."""
        return ""

    def to(self, device: torch.device) -> "Objective":
        self.student.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved in checkpoints beside the engine's (teacher, centre, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


"""DINO self-distillation (facebookresearch/dino): multi-crop student, EMA teacher, centring.

`DinoDistillation` holds what DINO adds to a student backbone - the EMA teacher, the centred
loss and the schedules - so the DINO objective and the CLIP+DINO hybrid share one implementation.
The teacher lives outside the DeepSpeed engine, in fp32, and reads the student's parameters
directly after each step (valid under ZeRO 0/1/2, where every rank holds whole parameters).
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.nn as nn

from data.loader import Batch, SampleProcessor
from data.transforms import DinoMultiCrop
from models.dino_head import DINOHead
from models.flops import linear_flops, vit_forward_flops
from models.vit import VisionTransformer, vit_config_from
from train.losses.dino_loss import DINOLoss
from train.objectives.base import Objective, cosine
from train.optim import steps_for


def multicrop_forward(backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """Run consecutive crops of equal resolution through the backbone together, then the head.

    crops: n x (B, 3, S_i, S_i) -> logits (n*B, K), crop-major (all images' crop 0 first).
    """
    features, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
            end += 1
        features.append(backbone(torch.cat(crops[start:end])))  # ((end-start)*B, W)
        start = end
    return head(torch.cat(features))  # (n*B, K)


class DinoStudent(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return multicrop_forward(self.backbone, self.head, crops)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def build_dino_head(cfg, in_dim: int) -> DINOHead:
    h = cfg.model.dino_head
    return DINOHead(in_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.n_layers, h.norm_last_layer)


def dino_transform_from(cfg) -> DinoMultiCrop:
    d = cfg.dino
    return DinoMultiCrop(d.global_crop_size, d.local_crop_size, d.n_global_crops, d.n_local_crops,
                         tuple(d.global_crop_scale), tuple(d.local_crop_scale), tuple(cfg.data.mean), tuple(cfg.data.std))


class DinoDistillation:
    """EMA teacher + centred cross-entropy for a (backbone, head) student pair."""

    def __init__(self, cfg, backbone: VisionTransformer, head: DINOHead, steps_per_epoch: int, total_steps: int):
        self.cfg, self.steps_per_epoch, self.total_steps = cfg.dino, steps_per_epoch, total_steps
        d, batch = cfg.dino, cfg.schedule.global_batch  # lengths in samples seen win over lengths in epochs
        self.teacher_temp_warmup_steps = steps_for(d.warmup_teacher_temp_samples, d.warmup_teacher_temp_epochs,
                                                   steps_per_epoch, batch)
        self.freeze_last_layer_steps = steps_for(d.freeze_last_layer_samples, d.freeze_last_layer_epochs,
                                                 steps_per_epoch, batch)
        self.teacher = DinoStudent(copy.deepcopy(backbone), copy.deepcopy(head))  # same init as the student
        self.teacher.requires_grad_(False).eval()
        self.student_params = list(backbone.parameters()) + list(head.parameters())
        self.teacher_params = list(self.teacher.backbone.parameters()) + list(self.teacher.head.parameters())
        self.loss_fn = DINOLoss(head.last_layer_v.shape[0], cfg.dino.n_global_crops, cfg.dino.student_temp,
                                cfg.dino.center_momentum, cfg.loss.impl, deferred_center=True)

    def teacher_temp(self, step: int) -> float:
        """Linear per step from warmup_teacher_temp to teacher_temp (DINO steps it once per epoch)."""
        warmup = self.teacher_temp_warmup_steps
        if step < warmup:
            return self.cfg.warmup_teacher_temp + (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp) * step / warmup
        return self.cfg.teacher_temp

    def teacher_momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.cfg.teacher_momentum, 1.0)

    def loss(self, student_logits: torch.Tensor, crops: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        global_crops = crops[: self.cfg.n_global_crops]
        with torch.no_grad():  # inside the trainer's autocast when it runs in bf16
            teacher_logits = self.teacher(global_crops)  # (G*B, K)
        temp = self.teacher_temp(step)
        with torch.no_grad():  # collapse monitor: uniform collapse -> log K, one-hot collapse -> 0 (before the centre moves)
            sample = teacher_logits[:256].float()  # a bounded slice: no (G*B, K) fp32 copy beside the fused loss
            probs = torch.softmax((sample - self.loss_fn.center) / temp, dim=-1)  # (<=256, K)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        if getattr(self.loss_fn, "native_dtype", False):  # the fused kernel reads bf16 logits without fp32 copies
            loss = self.loss_fn(student_logits, teacher_logits, temp)
        else:
            loss = self.loss_fn(student_logits.float(), teacher_logits.float(), temp)
        # torch.full, not torch.tensor(temp, device=...): that copies from pageable memory and syncs the stream
        return {"loss": loss, "metric/teacher_temp": torch.full((), temp, device=loss.device),
                "metric/teacher_entropy": entropy}

    @torch.no_grad()
    def update_teacher(self, step: int) -> dict[str, float]:
        """After an optimizer step: the centre (once per step, from all its micro-batches), then the EMA teacher."""
        self.loss_fn.commit_center()
        m = self.teacher_momentum(step)
        torch._foreach_mul_(self.teacher_params, m)
        torch._foreach_add_(self.teacher_params, [p.detach().float() for p in self.student_params], alpha=1.0 - m)
        return {"metric/teacher_momentum": m}

    def freezes_last_layer(self, step: int) -> bool:
        return step < self.freeze_last_layer_steps

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)
        self.loss_fn.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "dino_loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.loss_fn.load_state_dict(state["dino_loss"])


def dino_flops_per_sample(backbone: VisionTransformer, head: DINOHead, cfg) -> float:
    d = cfg.dino
    g = vit_forward_flops(backbone, d.global_crop_size) + linear_flops(head)
    local = vit_forward_flops(backbone, d.local_crop_size) + linear_flops(head)
    student = d.n_global_crops * g + d.n_local_crops * local
    return 3 * student + d.n_global_crops * g  # student fwd+bwd, teacher fwd on the global crops


class WithDinoTeacher:
    """Objective methods for anything that owns a `DinoDistillation` as `self.distill`."""
    distill: DinoDistillation
    student: nn.Module

    def after_step(self, step: int) -> dict[str, float]:
        return self.distill.update_teacher(step)

    def skip_step(self, step: int) -> None:
        self.distill.loss_fn.discard_center()  # a skipped step's teacher rows must not move the centre

    def init_vision_from(self, export_dir: str) -> None:
        super().init_vision_from(export_dir)
        self.distill.teacher.backbone.load_state_dict(self.vision_tower().state_dict())  # the teacher starts equal

    def group_of(self, param_name: str) -> str:
        return "last_layer" if param_name.startswith("head.last_layer") else ""

    def lr_scale(self, group_name: str, step: int) -> float:
        """0 holds the last layer during the freeze: the trainer then leaves its group out of the optimizer step
        (no update, Adam's moments and step count untouched), as DINO's cancel_gradients_last_layer."""
        return 0.0 if group_name.startswith("last_layer") and self.distill.freezes_last_layer(step) else 1.0

    def to(self, device: torch.device):
        self.student.to(device)
        self.distill.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.distill.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.distill.load_state_dict(state)


class DinoObjective(WithDinoTeacher, Objective):
    name = "dino"

    def __init__(self, cfg, steps_per_epoch: int, total_steps: int):
        super().__init__(cfg, steps_per_epoch, total_steps)
        backbone = VisionTransformer(vit_config_from(cfg.model.vision))
        self.student = DinoStudent(backbone, build_dino_head(cfg, backbone.width))
        self.distill = DinoDistillation(cfg, backbone, self.student.head, self.steps_per_epoch, self.total_steps)

    def compute_loss(self, student: Callable, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        return self.distill.loss(student(batch.crops), batch.crops, step)

    def no_weight_decay_names(self) -> set[str]:
        """None by name: DINO's get_params_groups leaves out of weight decay only biases and 1-D parameters (which
        param_groups always does), so pos_embed, cls_token (and registers) are decayed, unlike timm / open_clip."""
        return set()

    def vision_tower(self) -> nn.Module:
        return self.student.backbone

    def data_processor(self) -> SampleProcessor:
        return SampleProcessor(dino_transform=dino_transform_from(self.cfg))

    def flops_per_sample(self) -> float:
        return dino_flops_per_sample(self.student.backbone, self.student.head, self.cfg)

    def export(self) -> tuple[nn.Module, str, dict[str, Any]]:
        """The teacher backbone, as DINO evaluates it."""
        backbone = self.distill.teacher.backbone
        return backbone, "vit", {"vision": asdict(backbone.cfg), "image_mean": list(self.cfg.data.mean),
                                 "image_std": list(self.cfg.data.std)}

"""CLIP + lambda * DINO on one shared student backbone (the paper's open question 2).

The backbone sees a clean CLIP view (open_clip's crop, paired with the caption) and DINO's
multi-crop views; the text tower, projections and DINO head are trained jointly. The exported
encoder is the student CLIP (its image tower is what the text side is aligned with).
One optimizer: the CLIP run's settings and decay rule (`no_weight_decay_names`), DINO's per-parameter
clipping in the ViT-B/16 preset; the DINO term's temperatures, teacher and freeze are the DINO run's
(docs/recipes.md says which setting comes from which side, and why).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from data.loader import Batch, SampleProcessor
from models.clip import CLIP
from models.dino_head import DINOHead
from train.objectives.base import Objective
from train.objectives.contrastive import ContrastiveObjective, clip_flops_per_sample, contrastive_loss_terms
from train.objectives.dino import DinoDistillation, WithDinoTeacher, build_dino_head, dino_flops_per_sample, dino_transform_from, \
    multicrop_forward


class HybridStudent(nn.Module):
    def __init__(self, clip: CLIP, head: DINOHead):
        super().__init__()
        self.clip, self.head = clip, head

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, attention_mask, crops: list[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        out = self.clip(images, tokens, attention_mask)
        out["dino_logits"] = multicrop_forward(self.clip.visual, self.head, crops)  # (n_crops*B, K)
        return out

    def no_weight_decay(self) -> set[str]:
        return {f"clip.{n}" for n in self.clip.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)


class HybridObjective(WithDinoTeacher, Objective):
    name = "hybrid"

    def __init__(self, cfg, steps_per_epoch: int, total_steps: int):
        super().__init__(cfg, steps_per_epoch, total_steps)
        self.contrastive = ContrastiveObjective(cfg, steps_per_epoch, total_steps)  # builds the CLIP and its loss
        clip = self.contrastive.student
        self.student = HybridStudent(clip, build_dino_head(cfg, clip.visual.width))
        self.distill = DinoDistillation(cfg, clip.visual, self.student.head, self.steps_per_epoch, self.total_steps)
        self.dino_weight = cfg.objective.hybrid_dino_weight

    def compute_loss(self, student: Callable, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        out = student(batch.images, batch.tokens, batch.attention_mask, batch.crops)
        clip_terms = contrastive_loss_terms(self.contrastive.loss_fn, out, sigmoid=False)
        dino_terms = self.distill.loss(out["dino_logits"], batch.crops, step)
        terms = {"loss": clip_terms["loss"] + self.dino_weight * dino_terms["loss"],
                 "loss/clip": clip_terms["loss"].detach(), "loss/dino": dino_terms["loss"].detach()}
        terms.update({k: v for k, v in {**clip_terms, **dino_terms}.items() if k.startswith("metric/")})
        return terms

    def no_weight_decay_names(self) -> set[str]:
        """The CLIP run's decay rule for the CLIP part (one optimizer, CLIP's); the DINO head's weights are decayed
        under DINO's rule and CLIP's alike, its biases never."""
        return {f"clip.{n}" for n in self.contrastive.no_weight_decay_names()}

    def vision_tower(self) -> nn.Module:
        return self.student.clip.visual

    def after_step(self, step: int) -> dict[str, float]:
        self.student.clip.clamp_logit_scale_()
        return super().after_step(step)  # the DINO centre and EMA teacher

    def data_processor(self) -> SampleProcessor:
        processor = self.contrastive.data_processor()
        processor.dino_transform = dino_transform_from(self.cfg)
        return processor

    def flops_per_sample(self) -> float:
        clip = self.student.clip
        return (clip_flops_per_sample(clip, self.cfg.model.vision.image_size)
                + dino_flops_per_sample(clip.visual, self.student.head, self.cfg))

    def export(self) -> tuple[nn.Module, str, dict[str, Any]]:
        return self.contrastive.export()

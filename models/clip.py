"""CLIP / SigLIP model: image tower + text tower, linear projections into a joint space."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vit import VisionTransformer


class CLIP(nn.Module):
    """`text` is any module mapping (tokens, attention_mask) -> (B, text.width): our TextTransformer or
    a frozen Hugging Face encoder. `init_logit_bias` set -> SigLIP's learnable bias."""

    def __init__(self, visual: VisionTransformer, text: nn.Module, embed_dim: int = 512,
                 init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = 100.0,
                 init_logit_bias: Optional[float] = None):
        super().__init__()
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        self.visual_proj = nn.Linear(visual.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=visual.width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width ** -0.5)
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))  # log(1 / temperature)
        self.max_logit_scale = max_logit_scale
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_logit_bias))) if init_logit_bias is not None else None

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual_proj(self.visual(images))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(tokens, attention_mask))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at max_logit_scale (gradient stops at the clamp)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)[0]

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """After each optimizer step, as open_clip: keep the parameter in [0, ln max_logit_scale], so it never sits
        beyond the forward clamp where its gradient is zero (it could not come back). ZeRO-3: the local shard."""
        param = getattr(self.logit_scale, "ds_tensor", self.logit_scale)
        param.clamp_(0.0, math.log(self.max_logit_scale))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(tokens, attention_mask),
                "logit_scale": self.scale(),
                "logit_bias": None if self.logit_bias is None else self.logit_bias[0]}

    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

"""CLIP / SigLIP model: image tower + text tower, linear projections into a joint space."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vit import VisionTransformer


def text_projection(width: int, embed_dim: int, proj_type: str = "linear") -> nn.Module:
    """open_clip HFTextEncoder's `proj` (hf_model.py), PyTorch's default init as there: linear = Linear(width, embed);
    mlp = Linear(width, (width + embed) // 2), GELU, Linear(.., embed); no biases."""
    if proj_type == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if proj_type == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
    raise ValueError(f"unknown text projection {proj_type!r}; choose from linear, mlp")


class CLIP(nn.Module):
    """`text` is any module mapping (tokens, attention_mask) -> (B, text.width): our TextTransformer or
    a frozen Hugging Face encoder. `init_logit_bias` set -> SigLIP's learnable bias. `text_proj` None: a bias-free
    Linear drawn as open_clip's `text_projection` (std width^-0.5); else that module (`text_projection(...)`)."""

    def __init__(self, visual: VisionTransformer, text: nn.Module, embed_dim: int = 512,
                 init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = 100.0,
                 init_logit_bias: Optional[float] = None, text_proj: Optional[nn.Module] = None):
        super().__init__()
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        self.visual_proj = nn.Linear(visual.width, embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=visual.width ** -0.5)  # open_clip: visual.proj, scale * randn
        if text_proj is None:
            text_proj = nn.Linear(text.width, embed_dim, bias=False)
            nn.init.normal_(text_proj.weight, std=text.width ** -0.5)
        self.text_proj = text_proj
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
        """exp(logit_scale), the log clamped at ln max_logit_scale. The clamp's gradient passes at the bound itself,
        where `clamp_logit_scale_` puts the parameter, so the scale can come back down."""
        bound = math.log(self.max_logit_scale)  # a Python float: no tensor made per step
        return torch.where(self.logit_scale > bound, bound, self.logit_scale).exp()[0]  # torch.clamp: 0 grad at bound

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """After each optimizer step, as open_clip: the parameter back into [0, ln max_logit_scale]. Under DeepSpeed
        ZeRO the optimizer holds an fp32 master copy that overwrites the weights at every step: clamp that too
        (every rank calls this after the step)."""
        low, high = 0.0, math.log(self.max_logit_scale)
        param = self.logit_scale
        if hasattr(param, "ds_id"):  # ZeRO-3: each rank clamps its own (possibly empty, padded) partition
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            local = safe_get_local_fp32_param(param)  # (partition,)
            if local is not None:  # unconditionally: a data-dependent branch would sync the host every step
                safe_set_local_fp32_param(param, local.clamp(low, high))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, master.clamp(low, high))
        getattr(param, "ds_tensor", param).clamp_(low, high)

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

"""CLIP text tower: causal transformer over token ids, pooled at the end-of-text token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from models.transformer import Block, init_weights, run_blocks


@dataclass
class TextTowerConfig:
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    eot_id: Optional[int] = None  # pool at the first occurrence of this id; None: at argmax(ids) (open_clip)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    act: str = "gelu"  # gelu | quick_gelu (OpenAI CLIP weights)
    init: str = "open_clip"  # open_clip (its TextTransformer.init_parameters) | trunc_normal (std 0.02, zero biases)


TEXT_INITS = ("open_clip", "trunc_normal")


class TextTransformer(nn.Module):
    """tokens (B, L) -> pooled text feature (B, width), before the joint-space projection."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        if cfg.init not in TEXT_INITS:
            raise ValueError(f"unknown text tower init {cfg.init!r}; choose from {', '.join(TEXT_INITS)}")
        self.cfg = cfg
        self.width = cfg.width
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True, norm_eps=cfg.norm_eps, act=cfg.act)
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """open_clip's TextTransformer.init_parameters (open_clip/transformer.py): token embedding std 0.02,
        positions 0.01, per block in_proj (our qkv) W^-0.5, out_proj and c_proj W^-0.5 (2 layers)^-0.5, c_fc
        (2W)^-0.5; what it does not touch keeps its construction default: nn.MultiheadAttention's zero in_proj /
        out_proj biases, nn.Linear's U(+-1/sqrt(fan_in)) c_fc / c_proj biases, LayerNorms 1 / 0. (The joint-space
        projection, W^-0.5, lives in models/clip.py.) trunc_normal: std 0.02 Linears with zero biases, what this
        tower used before (draw order kept, so earlier runs reproduce)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.cfg.init == "trunc_normal":
            self.blocks.apply(init_weights)
            return
        W = self.cfg.width
        attn_std, fc_std, proj_std = W ** -0.5, (2 * W) ** -0.5, W ** -0.5 * (2 * self.cfg.layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for fc in (block.mlp.fc1, block.mlp.fc2):  # nn.Linear's default bias, as c_fc / c_proj
                bound = fc.in_features ** -0.5
                nn.init.uniform_(fc.bias, -bound, bound)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.eot_id is None:
            return tokens.argmax(dim=-1)  # (B,)
        return (tokens == self.cfg.eot_id).int().argmax(dim=-1)  # (B,) first end-of-text

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L = tokens.shape
        if L > self.cfg.context_length:
            raise ValueError(f"text length {L} exceeds the context length {self.cfg.context_length}")
        x = self.token_embedding(tokens) + self.pos_embed[:L]  # (B, L, W)
        x, _ = run_blocks(self.blocks, x, self.grad_checkpointing, causal=True)
        x = self.norm(x)
        return x[torch.arange(B, device=x.device), self.eot_positions(tokens)]  # (B, W)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "token_embedding.weight"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

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


class TextTransformer(nn.Module):
    """tokens (B, L) -> pooled text feature (B, width), before the joint-space projection."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True, norm_eps=cfg.norm_eps, act=cfg.act)
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.blocks.apply(init_weights)

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

"""Pre-norm transformer block shared by the ViT and the CLIP text tower.

Attention runs through `F.scaled_dot_product_attention` (PyTorch picks flash / memory-efficient /
math kernels itself); `attn_backend="flash"` calls flash-attn's kernel directly when it is installed
and the inputs are half precision on CUDA, and falls back to SDPA otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_flash_attn_func = None


def flash_attn_available() -> bool:
    global _flash_attn_func
    if _flash_attn_func is None:
        try:
            from flash_attn import flash_attn_func  # type: ignore

            _flash_attn_func = flash_attn_func
        except ImportError:
            _flash_attn_func = False
    return bool(_flash_attn_func)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out as [q; k; v] (open_clip's in_proj)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if backend == "flash" and not flash_attn_available():
            raise ImportError("attn_backend=flash needs flash-attn (pip install -e '.[flash]'); use attn_backend=sdpa")
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)  # (B, T, 3, h, hd)
        # qkv, not x: under autocast LayerNorm hands fp32 to the block, the Linear gives bf16/fp16
        if self.backend == "flash" and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
            q, k, v = qkv.unbind(2)  # (B, T, h, hd) each: flash-attn's layout
            out = _flash_attn_func(q, k, v, causal=causal).reshape(B, T, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, hd) each
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, T, hd)
            out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj(out)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP weights (HF `hidden_act="quick_gelu"`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def make_act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    Under torch.compile (train/compile.py) the rate is read from a tensor, not the Python float: every block of a
    tower has its own rate, and a float would be a constant of the graph (one compile per block instead of one)."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob
        self.register_buffer("keep_prob", torch.tensor(1.0 - prob), persistent=False)  # not in the state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if torch.compiler.is_compiling():  # inductor's RNG: not eager's masks, the same distribution
            keep = self.keep_prob
            mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
            return x * mask.to(x.dtype) / keep.to(x.dtype)
        if self.prob == 0.0:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """x + DropPath(LS(Attn(LN(x)))); x + DropPath(LS(MLP(LN(x))))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, layer_scale: Optional[float] = None, norm_eps: float = 1e-6,
                 attn_backend: str = "sdpa", act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias, attn_backend)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), causal=causal)))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (ViT / DINO convention)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool, causal: bool = False,
               collect: Optional[set[int]] = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Apply blocks in order; optionally keep the outputs of the blocks whose index is in `collect`."""
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        if grad_checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, causal, use_reentrant=False)
        else:
            x = block(x, causal=causal)
        if collect is not None and i in collect:
            kept[i] = x
    return x, kept


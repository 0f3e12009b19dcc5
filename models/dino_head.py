"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.transformer import init_weights


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim) prototype logits.

    The last layer is weight-normalised: weight = g * v / ||v|| per prototype row. With
    `norm_last_layer` (the DINO default) g is fixed at 1, so only directions are learned.

    Initialisation as facebookresearch/dino's DINOHead, draw for draw: the MLP's Linears get
    trunc_normal(std .02) weights and zero biases (`self.apply(self._init_weights)`, run before the
    last layer exists), while the last layer keeps torch's default Linear init (kaiming_uniform,
    a=sqrt(5): U(+-1/sqrt(bottleneck_dim))); weight_norm then sets g = ||v|| and DINO fills g with 1.
    v's scale matters under weight norm: the step on a prototype's direction goes as lr / ||v||.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(n_layers, 1) - 1) + [bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(init_weights)
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))  # (K, d) directions
        nn.init.kaiming_uniform_(self.last_layer_v, a=math.sqrt(5))  # nn.Linear(d, K, bias=False)'s own init
        self.last_layer_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))  # (K, 1) norms

    def prototypes(self) -> torch.Tensor:
        weight = F.normalize(self.last_layer_v, dim=1)  # (K, d)
        return weight if self.last_layer_g is None else weight * self.last_layer_g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, d)
        return x @ self.prototypes().t()  # (B, K)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Frozen (no update at all) during the first epoch(s) of DINO training."""
        return [p for p in (self.last_layer_v, self.last_layer_g) if p is not None]

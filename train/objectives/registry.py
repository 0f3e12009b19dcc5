"""Objective lookup by config name."""
from __future__ import annotations

from train.objectives.base import Objective


def objective_class(cfg) -> type[Objective]:
    name = cfg.objective.name
    if name in ("clip", "siglip", "clip_frozen_text"):
        from train.objectives.contrastive import ContrastiveObjective as cls
    elif name == "dino":
        from train.objectives.dino import DinoObjective as cls
    elif name == "hybrid":
        from train.objectives.hybrid import HybridObjective as cls
    elif name == "vlm":
        from train.objectives.vlm import VLMObjective as cls
    else:
        raise ValueError(f"unknown objective {name!r}")
    return cls


def build_objective(cfg, steps_per_epoch: int, total_steps: int) -> Objective:
    return objective_class(cfg)(cfg, steps_per_epoch, total_steps)

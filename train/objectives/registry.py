"""Objective lookup by config name."""
from __future__ import annotations

from train.objectives.base import Objective


def build_objective(cfg, steps_per_epoch: int, total_steps: int) -> Objective:
    from train.objectives.contrastive import ContrastiveObjective
    from train.objectives.dino import DinoObjective
    from train.objectives.hybrid import HybridObjective

    name = cfg.objective.name
    if name in ("clip", "siglip", "clip_frozen_text"):
        return ContrastiveObjective(cfg, steps_per_epoch, total_steps)
    if name == "dino":
        return DinoObjective(cfg, steps_per_epoch, total_steps)
    if name == "hybrid":
        return HybridObjective(cfg, steps_per_epoch, total_steps)
    raise ValueError(f"unknown objective {name!r}")

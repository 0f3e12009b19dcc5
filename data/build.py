"""Build a rank's training loader for the configured backend (`data.backend`).

The trainer only sees an object that iterates `Batch`es forever and has
`state_dict()/load_state_dict()/skipped`; which backend produced them does not matter to it.
"""
from __future__ import annotations

from data.loader import PretrainLoader, SampleProcessor


def build_train_loader(cfg, shards: list[str], processor: SampleProcessor, micro_batch: int, rank: int, world: int,
                       device_type: str):
    d = cfg.data
    if d.backend == "cpu":
        return PretrainLoader(shards, processor, micro_batch, cfg.seed, rank, world, d.workers, d.shuffle_buffer,
                              d.resampled, pin_memory=device_type == "cuda")
    raise ValueError(f"data.backend={d.backend!r} is not available yet (choose cpu)")

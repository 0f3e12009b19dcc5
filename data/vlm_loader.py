"""A rank's endless, exactly resumable stream of VLM micro-batches (the trainer's loader interface).

Epoch e's micro-batches for rank r are a pure function of (seed, e, the records' lengths, micro, world, accum)
(data/vlm_sampler.py), prepared by a map-style DataLoader, which keeps their order whatever the worker timing.
The position is (epoch, micro-batches consumed in it): a resumed run recomputes the epoch's order and starts
at the next batch. Skipped samples shrink their batch (counted by reason and logged); a micro-batch with no
usable sample is passed over; past `max_skipped` in total the run stops with the reasons.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from data.shards import DataError
from data.vlm_data import ConversationDataset, VLMBatch, collate
from data.vlm_sampler import rank_batches

log = logging.getLogger("clipdino.data")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class VLMLoader:
    def __init__(self, dataset: ConversationDataset, lengths: list[int], micro: int, world: int, accum: int,
                 rank: int, seed: int, workers: int = 2, grouped: bool = True, pad_id: int = 0,
                 max_skipped: int = 100, pin_memory: bool = False):
        self.dataset, self.lengths = dataset, lengths
        self.micro, self.world, self.accum, self.rank, self.seed = micro, world, accum, rank, seed
        self.workers, self.grouped, self.pad_id, self.max_skipped = workers, grouped, pad_id, max_skipped
        self.pin_memory = pin_memory
        self.epoch, self.batch = 0, 0  # position: micro-batches of `epoch` consumed
        self.skipped: dict[str, int] = {}
        self._logged = 0

    def batches_per_epoch(self) -> int:
        return len(self.lengths) // (self.micro * self.world)

    def state_dict(self) -> dict[str, Any]:
        return {"backend": "vlm", "epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped),
                "micro": self.micro, "world": self.world, "accum": self.accum, "seed": self.seed,
                "samples": len(self.lengths), "grouped": self.grouped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend") != "vlm":
            raise DataError("the checkpoint's data position is not a VLM loader's; resume a VLM run from its own "
                            "checkpoints")
        for key in ("micro", "world", "accum", "seed", "samples", "grouped"):
            mine = len(self.lengths) if key == "samples" else getattr(self, key)
            if state.get(key) != mine:
                raise DataError(f"cannot resume the data position exactly: the checkpoint has data {key}={state.get(key)}, "
                                f"this run {mine}; keep the data and batch settings unchanged when resuming")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = dict(state.get("skipped", {}))

    def _count(self, raw: dict[str, Any]) -> None:
        for reason, n in raw["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        for note in raw["notes"]:
            self._logged += 1
            if self._logged <= 5 or self._logged % 100 == 0:
                log.warning("skipping a sample (%s) [%d skipped so far on rank %d]", note, sum(self.skipped.values()),
                            self.rank)
        total = sum(self.skipped.values())
        if total > self.max_skipped:
            raise DataError(f"{total} samples skipped on rank {self.rank}, more than data.max_skipped="
                            f"{self.max_skipped} ({self.skipped}); last: {raw['notes'][-1] if raw['notes'] else '?'}")

    def __iter__(self) -> Iterator[VLMBatch]:
        while True:
            batches = rank_batches(self.lengths, self.micro, self.world, self.accum, self.seed, self.epoch, self.rank,
                                   self.grouped)
            if not batches:
                raise DataError(f"{len(self.lengths)} samples cannot fill one micro-batch of {self.micro} on each of "
                                f"{self.world} rank(s)")
            loader = DataLoader(self.dataset, batch_sampler=batches[self.batch:], num_workers=self.workers,
                                collate_fn=functools.partial(collate, pad_id=self.pad_id),
                                worker_init_fn=_worker_init if self.workers else None, pin_memory=self.pin_memory,
                                prefetch_factor=4 if self.workers else None,
                                generator=torch.Generator().manual_seed(self.seed))  # no draw from the global RNG
            for raw in loader:
                self.batch += 1
                self._count(raw)
                if raw.get("empty"):
                    continue
                yield VLMBatch(raw["ids"], raw["input_ids"], raw["labels"], raw["attention_mask"], raw["pixel_values"],
                               raw["has_image"], raw["skipped"])
            self.epoch, self.batch = self.epoch + 1, 0

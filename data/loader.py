"""Deterministic, resumable webdataset loader (CPU decoding backend).

Each rank runs `workers` loader processes. Logical worker w of rank r reads an endless series of
*passes*; pass p covers the shards `shards_for_pass(seed, p, r, w)` (every shard once per pass
across all readers), shuffles samples through a buffer seeded by (seed, r, w, p), and augments
sample i of the pass with an RNG seeded by (seed, r, w, p, i). Batches are formed inside the
worker, and torch's DataLoader hands them out round-robin over workers, so the rank's batch
sequence depends only on (seed, rank, world, workers) - never on timing.

Each batch carries its worker's position (pass, samples read in the pass). The trainer keeps the
latest position of every worker plus the number of batches consumed; on resume each worker
restarts at its position (re-reading only raw tar bytes up to its offset, not decoding them) and
the round-robin is rotated so the next batch comes from the right worker.
Corrupt or incomplete samples are skipped, counted, and logged (first few, then every 100th).
"""
from __future__ import annotations

import io
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import DataError, check_enough_shards, hash_seed, shards_for_pass

log = logging.getLogger("clipdino.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_EMPTY_PASSES = 3


@dataclass
class Batch:
    """One rank's micro-batch. Tensors are on the CPU until the trainer moves them."""
    keys: list[str]
    images: Optional[torch.Tensor] = None  # (B, 3, S, S) CLIP view
    crops: Optional[list[torch.Tensor]] = None  # DINO: n_global x (B, 3, G, G), then n_local x (B, 3, L, L)
    tokens: Optional[torch.Tensor] = None  # (B, L) token ids
    attention_mask: Optional[torch.Tensor] = None  # (B, L), HF text towers only
    worker: int = 0  # logical worker that produced it
    position: tuple[int, int] = (0, 0)  # (pass, raw samples read in the pass) after this batch
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples dropped while making it, by reason

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "Batch":
        def move(t):
            if t is None:
                return None
            t = t.to(device, non_blocking=True)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return Batch(self.keys, move(self.images), [move(c) for c in self.crops] if self.crops else None,
                     move(self.tokens), move(self.attention_mask), self.worker, self.position, self.skipped)


@dataclass
class SampleProcessor:
    """Raw webdataset sample (dict of bytes) -> dict of tensors. Picklable (runs in loader workers)."""
    clip_transform: Optional[Callable] = None  # -> (3, S, S)
    dino_transform: Optional[Callable] = None  # -> list of crops
    text_encoder: Optional[Callable] = None  # list[str] -> LongTensor (N, L) or dict(input_ids, attention_mask)

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image_bytes is None:
            raise SampleError("missing_image")
        caption = None
        if self.text_encoder is not None:
            if "txt" not in sample:
                raise SampleError("missing_text")
            caption = sample["txt"].decode("utf-8", errors="replace").strip()
        try:
            with Image.open(io.BytesIO(image_bytes)) as im:
                img = pil_to_uint8(im)  # (3, H, W)
        except Exception as e:  # PIL raises many types for bad bytes
            raise SampleError("decode_error") from e
        out: dict[str, Any] = {"key": sample["__key__"], "caption": caption}
        if self.clip_transform is not None:
            out["image"] = self.clip_transform(img, rng)
        if self.dino_transform is not None:
            out["crops"] = self.dino_transform(img, rng)
        return out

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"keys": [it["key"] for it in items]}
        if self.clip_transform is not None:
            out["images"] = torch.stack([it["image"] for it in items])
        if self.dino_transform is not None:
            out["crops"] = [torch.stack([it["crops"][c] for it in items]) for c in range(len(items[0]["crops"]))]
        if self.text_encoder is not None:
            encoded = self.text_encoder([it["caption"] for it in items])
            if isinstance(encoded, dict):
                out["tokens"], out["attention_mask"] = encoded["input_ids"], encoded.get("attention_mask")
            else:
                out["tokens"] = encoded
        return out


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 RGB tensor (the training loader's and the evaluation's decoding)."""
    return torch.from_numpy(_to_rgb_array(im)).permute(2, 0, 1).contiguous()


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    return np.array(im.convert("RGB"))  # (H, W, 3) uint8, a writable copy


class SampleError(Exception):
    """A sample that cannot be used; the argument is the reason counted in the statistics."""


class ShardStream(IterableDataset):
    """The endless, deterministic batch stream of one rank (see the module docstring)."""

    def __init__(self, shards: list[str], processor: SampleProcessor, batch_size: int, seed: int, rank: int,
                 world: int, workers: int, shuffle_buffer: int, resampled: bool,
                 start: Optional[dict[int, tuple[int, int]]] = None, rotation: int = 0):
        self.shards, self.processor, self.batch_size = shards, processor, batch_size
        self.seed, self.rank, self.world, self.workers = seed, rank, world, max(workers, 1)
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.start = start or {}
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.workers
        if info is not None:
            torch.set_num_threads(1)
        pass_index, offset = self.start.get(worker, (0, 0))
        items: list[dict[str, Any]] = []
        skipped: dict[str, int] = {}
        empty_passes = 0
        while True:
            produced = False
            for index, sample in enumerate(self._pass_samples(pass_index, worker, skipped)):
                if index < offset:
                    continue  # already consumed before the resume: skip without decoding
                rng = random.Random(hash_seed(self.seed, self.rank, worker, pass_index, index))
                try:
                    items.append(self.processor(sample, rng))
                    produced = True
                except SampleError as e:
                    _count_bad(skipped, str(e), sample)
                    continue
                if len(items) == self.batch_size:
                    batch = self.processor.collate(items)
                    batch.update(worker=worker, position=(pass_index, index + 1), skipped=dict(skipped))
                    items = []
                    skipped.clear()  # the same dict the shard reader counts into
                    yield batch
            empty_passes = 0 if produced or offset else empty_passes + 1
            if empty_passes >= MAX_EMPTY_PASSES:
                raise DataError(f"rank {self.rank} loader worker {worker}: {MAX_EMPTY_PASSES} passes over its shards "
                                f"gave no usable sample (problems: {skipped or 'no samples'}); check the shards with "
                                f"`python -m data.validate` (data issue) or fix data.train")
            pass_index, offset = pass_index + 1, 0

    def _pass_samples(self, pass_index: int, worker: int, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Raw samples of one pass, after the seeded shuffle buffer."""
        shards = shards_for_pass(self.shards, self.seed, pass_index, self.rank, self.world, worker, self.workers,
                                 self.resampled)

        def on_error(exn: Exception) -> bool:
            url = next((a for a in reversed(exn.args) if isinstance(a, str) and a in shards), "?")
            _count_bad(skipped, "unreadable_shard", {"__key__": None, "__url__": url}, exn.args[0] if exn.args else exn)
            return True  # skip and continue with the next file / shard

        raw = webdataset.tariterators.tarfile_samples([{"url": s} for s in shards], handler=on_error)
        rng = random.Random(hash_seed(self.seed, self.rank, worker, pass_index, 0xB0F))
        buffer: list[dict[str, Any]] = []
        for sample in raw:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


_bad_seen = 0


def _count_bad(skipped: dict[str, int], reason: str, sample: dict[str, Any], detail: Any = None) -> None:
    global _bad_seen
    skipped[reason] = skipped.get(reason, 0) + 1
    _bad_seen += 1
    if _bad_seen <= 5 or _bad_seen % 100 == 0:
        where = sample.get("__url__", "")
        log.warning("skipping bad sample (%s) key=%r shard=%s%s [%d bad so far in this worker]", reason,
                    sample.get("__key__"), where, f": {detail}" if detail else "", _bad_seen)


class PretrainLoader:
    """Iterates a rank's batches forever and tracks the position needed for exact resume."""

    def __init__(self, shards: list[str], processor: SampleProcessor, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, workers: int = 2, shuffle_buffer: int = 1000, resampled: bool = False,
                 pin_memory: bool = False):
        check_enough_shards(shards, world, workers, resampled)
        self.shards, self.processor, self.batch_size = shards, processor, batch_size
        self.seed, self.rank, self.world, self.workers = seed, rank, world, workers
        self.shuffle_buffer, self.resampled, self.pin_memory = shuffle_buffer, resampled, pin_memory
        self.batches = 0  # consumed by the trainer
        self.positions: dict[int, tuple[int, int]] = {}
        self.skipped: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"backend": "cpu", "batches": self.batches,
                "positions": {int(k): list(v) for k, v in self.positions.items()},
                "skipped": dict(self.skipped), "workers": self.workers, "world": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend", "cpu") != "cpu":
            raise DataError(f"the checkpoint's data position comes from data.backend={state['backend']}; resume with "
                            f"that backend (the two loaders' streams differ)")
        for key in ("workers", "world", "seed"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"cannot resume the data position exactly: checkpoint has data {key}={state.get(key)}, "
                                f"this run has {getattr(self, key)}; keep it unchanged when resuming")
        self.batches = int(state["batches"])
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}
        self.skipped = dict(state.get("skipped", {}))

    def __iter__(self) -> Iterator[Batch]:
        n = max(self.workers, 1)
        stream = ShardStream(self.shards, self.processor, self.batch_size, self.seed, self.rank, self.world,
                             self.workers, self.shuffle_buffer, self.resampled, self.positions, self.batches % n)
        # a private generator: creating the iterator must not draw from the global torch RNG (exact resume)
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.workers else None, persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.seed))
        for raw in loader:
            batch = Batch(keys=raw["keys"], images=raw.get("images"), crops=raw.get("crops"), tokens=raw.get("tokens"),
                          attention_mask=raw.get("attention_mask"), worker=raw["worker"],
                          position=tuple(raw["position"]), skipped=raw["skipped"])
            self.batches += 1
            self.positions[batch.worker] = batch.position
            for reason, count in batch.skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
            yield batch

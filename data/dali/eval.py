"""`DaliEvalLoader`: one pass over labeled shards with the eval transform (resize + centre crop) in DALI.

    loader = DaliEvalLoader(shards, EvalTransform(224), batch_size=256, threads=8)
    for keys, images, labels in loader: ...     # images (B, 3, S, S) float, labels (B,) int64

Samples come in shard order, each exactly once; with `num_shards` > 1 every rank reads its DALI part
(near-equal, contiguous) and the padding DALI adds to the last batch is cut off. The shards should
pass `python -m data.validate --require image,label` first (DALI cannot skip a bad image).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch

from data.dali import require_dali
from data.dali.index import ensure_indexes, index_samples
from data.dali.loader import _text, dali_error, sample_key, to_torch
from data.dali.pipelines import build_eval_pipeline
from data.transforms import EvalTransform


class DaliEvalLoader:
    def __init__(self, shards: list[str], transform: EvalTransform, batch_size: int, threads: int = 2,
                 label_ext: str = "cls", shard_id: int = 0, num_shards: int = 1, decoder: str = "cpu",
                 device_id: Optional[int] = None, index_dir: str = ""):
        require_dali()
        self.shards, self.transform, self.batch_size, self.threads = shards, transform, batch_size, max(threads, 1)
        self.label_ext, self.shard_id, self.num_shards = label_ext, shard_id, num_shards
        self.decoder, self.device_id = decoder, device_id
        self.indexes = ensure_indexes(shards, index_dir)
        total = sum(index_samples(i) for i in self.indexes)
        # DALI's split: part i is [total * i // n, total * (i + 1) // n)
        self.samples = total * (shard_id + 1) // num_shards - total * shard_id // num_shards

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        pipe = build_eval_pipeline(self.transform, self.shards, self.indexes, self.batch_size, self.threads,
                                   self.label_ext, self.shard_id, self.num_shards, self.decoder, self.device_id)
        left, batch = self.samples, 0
        try:
            pipe.build()
            for batch in range(math.ceil(self.samples / self.batch_size)):
                keys, images, labels = pipe.run()
                n = min(left, self.batch_size)  # the last batch is padded by DALI: cut it
                left -= n
                yield ([sample_key(_text(t)) for t in keys][:n], to_torch(images)[:n],  # (n, 3, S, S)
                       torch.tensor([int(np.array(t).tobytes()) for t in labels][:n], dtype=torch.long))  # (n,)
        except RuntimeError as e:
            raise dali_error(e, self.shard_id, batch) from None

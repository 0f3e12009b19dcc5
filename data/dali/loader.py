"""`DaliLoader`: a rank's endless `Batch` stream from a DALI pipeline, with the CPU loader's API.

Sharding: `fn.readers.webdataset(shard_id=rank, num_shards=world)` splits the concatenated sample
list of all shards into `world` contiguous, near-equal parts (by samples, not by tar files). An
epoch of a rank is one pass over its part; `shuffle_after_epoch` reshuffles the tar order with the
same seed on every rank, so each epoch re-partitions the data and, across ranks, every sample is
read exactly once per epoch. The stream never stops at an epoch end (the trainer is step-based), so
every rank runs the same number of steps whatever the part sizes.

Resume is exact: `state_dict()` holds DALI's pipeline checkpoint (reader positions, shuffle buffer
and every random generator) after the batches consumed, and a restored pipeline continues with the
same batches, bit for bit on CPU. Bad samples are not skipped (DALI cannot): shards must pass
`python -m data.validate` first, so `skipped` stays empty.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from data.dali import require_dali
from data.dali.pipelines import TrainSpec, build_train_pipeline
from data.loader import Batch, SampleProcessor
from data.shards import DataError, hash_seed
from data.transforms import ClipTransform, DinoMultiCrop

log = logging.getLogger("clipdino.data")
WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^./]+)\.")  # webdataset's key: the member path up to its first dot


def spec_from_processor(processor: SampleProcessor) -> TrainSpec:
    """The DALI equivalent of an objective's SampleProcessor (same transform parameters)."""
    for name, kind in (("clip_transform", ClipTransform), ("dino_transform", DinoMultiCrop)):
        value = getattr(processor, name)
        if value is not None and not isinstance(value, kind):
            raise DataError(f"data.backend=dali builds {kind.__name__} in DALI; this objective's {name} is a "
                            f"{type(value).__name__}: use data.backend=cpu")
    return TrainSpec(processor.clip_transform, processor.dino_transform, processor.text_encoder is not None)


def sample_key(source_info: str) -> str:
    """'path/shard.tar:offset:member.ext' (DALI's source_info) -> the webdataset key of the member."""
    member = source_info.rsplit(":", 2)[-1]
    match = WEBDATASET_KEY.match(member)
    return match.group(1) if match else member


def shards_fingerprint(shards: list[str]) -> list[list]:
    """[name, bytes] per shard: a rewritten or replaced shard list no longer matches a checkpoint."""
    return [[Path(s).name, Path(s).stat().st_size] for s in shards]


def dali_error(error: Exception, rank: int, batch: int) -> DataError:
    """DALI's multi-line pipeline error -> one line naming the operator, the cause and the fix."""
    text = str(error)
    op = re.search(r"Error in \w+ operator `([^`]+)`", text)
    cause = re.search(r"encountered:\s*\n\s*\n?(.+)", text)
    detail = (cause.group(1).strip() if cause else text.strip().splitlines()[-1])[:200]
    return DataError(f"rank {rank}: DALI failed while making batch {batch + 1}"
                     f"{' in ' + op.group(1) if op else ''}: {detail}. The shards hold data DALI cannot read "
                     f"(changed after validation?): check them with `python -m data.validate SHARDS --rewrite OUT`; "
                     f"checkpoints already written are intact")


class DaliLoader:
    """Iterates a rank's batches forever; `state_dict()` makes resume exact (see the module docstring)."""

    def __init__(self, shards: list[str], indexes: list[str], processor: SampleProcessor, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, threads: int = 2, shuffle_buffer: int = 1000, decoder: str = "cpu",
                 device_id: Optional[int] = None, prefetch: int = 2):
        require_dali()
        if decoder not in ("cpu", "mixed"):
            raise DataError(f"DALI decoder must be cpu or mixed, got {decoder!r}")
        if decoder == "mixed" and device_id is None:
            raise DataError("GPU decoding (mixed) needs a CUDA device: set data.dali_decoder=cpu on this machine")
        self.shards, self.indexes, self.processor = shards, indexes, processor
        self.spec = spec_from_processor(processor)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.threads, self.shuffle_buffer, self.prefetch = max(threads, 1), shuffle_buffer, prefetch
        self.decoder, self.device_id = decoder, device_id
        self.batches = 0  # consumed by the trainer
        self.skipped: dict[str, int] = {}  # always empty: validated shards have no bad samples
        self.restart = 0  # bumped when a checkpoint's data position cannot be used (shards changed)
        self._checkpoint: Optional[str] = None
        self._pipe = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"backend": "dali", "batches": self.batches, "checkpoint": checkpoint, "restart": self.restart,
                "seed": self.seed, "world": self.world, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "outputs": self.spec.outputs(),
                "shards": shards_fingerprint(self.shards), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("backend", "cpu") != "dali":
            raise DataError(f"the checkpoint's data position comes from data.backend={state.get('backend', 'cpu')}; "
                            f"resume with that backend (the two loaders' streams differ)")
        current = {"seed": self.seed, "world": self.world, "batch_size": self.batch_size,
                   "shuffle_buffer": self.shuffle_buffer, "outputs": self.spec.outputs()}
        for key, value in current.items():  # (shuffle_buffer / outputs: absent from older checkpoints)
            if key in state and state[key] != value:
                what = "pipeline outputs (crop counts / views)" if key == "outputs" else f"data {key}"
                raise DataError(f"cannot resume the DALI data position exactly: the checkpoint has {what}="
                                f"{state[key]}, this run has {value}; keep it unchanged when resuming")
        self.batches = int(state["batches"])
        self.skipped = dict(state.get("skipped", {}))
        self.restart = int(state.get("restart", 0))
        if state.get("shards") != shards_fingerprint(self.shards):
            self.restart += 1  # e.g. shards rewritten by data.validate: keep the weights, start a fresh data order
            log.warning("data.train differs from the checkpoint's shard list: the DALI stream restarts at an epoch "
                        "start with a new order (the model and optimizer state resume exactly)")
            self._checkpoint = None
        else:
            self._checkpoint = state.get("checkpoint")

    # ------------------------------------------------------------------ iteration
    def _build(self):
        seed = hash_seed(self.seed, self.rank, self.restart, 0xDA11) % 2**31  # per rank: buffer + augmentation
        order_seed = hash_seed(self.seed, 0x0DE2) % 2**31  # the same on every rank: the per-epoch tar order
        pipe = build_train_pipeline(self.spec, self.shards, self.indexes, self.batch_size, self.threads, seed,
                                    order_seed, self.rank, self.world, self.shuffle_buffer, self.decoder,
                                    self.device_id, self.prefetch, self._checkpoint)
        try:
            pipe.build()
        except RuntimeError as e:
            raise dali_error(e, self.rank, self.batches) from None
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        if self._pipe is not None:  # a second iterator continues where the first one stopped
            self._checkpoint = self._pipe.checkpoint()
        self._pipe = self._build()
        names = self.spec.outputs()
        n_crops = len(names) - names.index("crop0") if self.spec.dino else 0
        while True:
            try:
                outputs = dict(zip(names, self._pipe.run()))
            except RuntimeError as e:
                raise dali_error(e, self.rank, self.batches) from None
            keys = [sample_key(_text(t)) for t in outputs["key"]]
            batch = Batch(keys=keys, position=(0, self.batches + 1))
            if self.spec.text:
                encoded = self.processor.text_encoder([_text(t).strip() for t in outputs["text"]])
                if isinstance(encoded, dict):
                    batch.tokens, batch.attention_mask = encoded["input_ids"], encoded.get("attention_mask")
                else:
                    batch.tokens = encoded  # (B, L)
            if self.spec.clip:
                batch.images = to_torch(outputs["image"])  # (B, 3, S, S)
            if n_crops:
                batch.crops = [to_torch(outputs[f"crop{i}"]) for i in range(n_crops)]  # (B, 3, G|L, G|L) each
            self.batches += 1
            yield batch


def _text(tensor) -> str:
    return np.array(tensor).tobytes().decode("utf-8", errors="replace")


def to_torch(tensor_list) -> torch.Tensor:
    """A DALI batch of equal-shape samples -> a torch tensor of its own (DALI reuses its buffers)."""
    dense = tensor_list.as_tensor()
    if type(tensor_list).__name__ == "TensorListGPU":  # mixed decoding: copy on the GPU
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(dense))

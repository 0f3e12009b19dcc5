"""Device prefetch: the next micro-batch is copied to the GPU on a side stream while the current one computes.

    batches = DevicePrefetcher(loader, device)
    batch = batches.next(ahead=True)   # on the device; the copy of the one after it is already under way

On CUDA the prefetcher holds one batch ahead: it takes it from the loader, pins any host tensor the DataLoader
did not pin (DALI's CPU outputs; the CPU and VLM loaders pin in their DataLoader), and copies it with
`non_blocking=True` on its own stream. Handing it out, the compute stream waits for that copy (an event, no host
wait) and every tensor gets `record_stream`, so the caching allocator does not give its memory back to the copy
stream while the compute stream may still read it (the NVIDIA apex `data_prefetcher` pattern). Tensors already
on the GPU (DALI's `mixed` decoder) pass through. On the CPU it is a pass-through: `next()` is `next(loader)`.

Exact resume: a held batch has already advanced `loader.state_dict()`. The trainer asks for no batch ahead on the
last micro-batch of a step that may save a checkpoint, and `state_dict()` refuses while a batch is held, so a
checkpoint's data position never skips a batch.

`wait_s()` is the step's data wait: host time in `next()` (waiting for the loader, pinning, enqueuing the copy) plus,
on CUDA, the time the compute stream waited for a copy to land (CUDA events, read only when asked: on logged steps,
after the step's own sync, when they are long complete).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`obj` with `fn` applied to every tensor in it: a tensor, a list / tuple / dict of them, or a dataclass batch
    (`data.loader.Batch`, `data.vlm_data.VLMBatch`); anything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in `obj` (the same structures as `map_tensors`)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors_of(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_of(x)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, f.name))


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


class DevicePrefetcher:
    ahead_on_cpu = False  # tests set it: the CPU then holds a batch ahead too (the bookkeeping CUDA runs, no streams)

    def __init__(self, loader: Iterable, device: torch.device):
        self.loader, self.device = loader, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ahead = self.cuda or self.ahead_on_cpu
        self._iter = None  # made on the first next(): creating it must not happen before a resume's load_state_dict
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._held: Optional[tuple[Any, Optional[torch.cuda.Event]]] = None
        self.reset_wait()

    def _fetch(self) -> tuple[Any, Optional["torch.cuda.Event"]]:
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)  # outside the copy stream: DALI's mixed outputs are written on the compute stream
        if self._stream is None:
            return map_tensors(batch, lambda t: t.to(self.device)), None
        batch = map_tensors(batch, _pinned)
        with torch.cuda.stream(self._stream):
            batch = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
            ready = self._stream.record_event()
        return batch, ready

    def next(self, ahead: bool = True) -> Any:
        """The next batch, on the device. `ahead=False`: hold nothing after it (the trainer's last micro-batch before
        a possible checkpoint)."""
        t0 = time.perf_counter()
        held, self._held = self._held, None
        batch, ready = held if held is not None else self._fetch()
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            compute.wait_event(ready)  # device-side: the host does not wait
            end.record(compute)
            self._copy_waits.append((start, end))
            for t in tensors_of(batch):
                if t.is_cuda:  # its memory came from the copy stream's pool; compute reads it from now on
                    t.record_stream(compute)
        if ahead and self.ahead:
            self._held = self._fetch()
        self._host_wait += time.perf_counter() - t0
        return batch

    def reset_wait(self) -> None:
        self._host_wait = 0.0
        self._copy_waits: list[tuple[Any, Any]] = []

    def wait_s(self) -> float:
        """Seconds the step waited for data since `reset_wait()`: host wait + (CUDA) copy wait on the compute stream."""
        copy = 0.0
        for start, end in self._copy_waits:
            end.synchronize()  # already complete when called after the step's sync: returns at once
            copy += start.elapsed_time(end) / 1000.0
        return self._host_wait + copy

    def state_dict(self) -> dict[str, Any]:
        if self._held is not None:
            raise RuntimeError("a prefetched batch is held: the loader's position would skip it (the trainer asks "
                               "for no batch ahead before a checkpoint)")
        return self.loader.state_dict()

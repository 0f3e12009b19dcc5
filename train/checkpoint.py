"""Checkpoints: DeepSpeed engine state + per-rank client state, complete-or-ignored, last K kept.

Layout under RUN/checkpoints/:
    step_0000100/               DeepSpeed's files (model, ZeRO optimizer partitions)
    step_0000100/rank_00000.pt  this rank's RNG states and data position
    step_0000100/client.pt      objective state (EMA teacher, DINO centre), step, samples seen
    step_0000100/COMPLETE       written last, by rank 0, after every rank finished
A folder without COMPLETE (a crash during the save) is never resumed from, and the previous
complete checkpoint stays loadable. Our own files are read with weights_only=True.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from train.distributed import barrier

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume_checkpoint(resume: str, ckpt_dir: str | Path) -> Optional[Path]:
    """`auto`: the newest complete checkpoint (None if there is none); a path: that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint folder (no {MARKER} marker)")
    return path


def set_aside_newer(ckpt_dir: str | Path, step: int, complete_only: bool = True) -> list[Path]:
    """Rename checkpoints (or, complete_only=False, any step_* folder: exports) newer than `step` to
    abandoned_step_* (a run rolled back with resume=PATH): `resume=auto`, keep-K and the eval watcher then see
    only this run's line, and nothing is deleted. Main rank only."""
    moved = []
    root = Path(ckpt_dir)
    folders = (complete_checkpoints(root) if complete_only else
               sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else [])
    for folder in folders:
        number = folder.name.split("_")[1]  # step_NNNNNNN
        if number.isdigit() and int(number) > step:
            target = folder.with_name(f"abandoned_{folder.name}_{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(folder, target)
            moved.append(target)
    return moved


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def params_finite(module: torch.nn.Module) -> bool:
    """This rank's weights (its ZeRO-3 partition when parameters are partitioned) are all finite."""
    tensors = (getattr(p, "ds_tensor", p) for p in module.parameters())
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, rank: int, client: dict[str, Any],
                    rank_state: dict[str, Any], keep: int, frozen: bool = True) -> Path:
    """Collective: every rank calls it. Refuses to write non-finite weights. `frozen=False` leaves out parameters
    that do not train (a VLM's tower and, in stage 1, its LLM: rebuilt from their sources on resume)."""
    device = getattr(engine, "device", None) or next(engine.module.parameters()).device  # NCCL reduces CUDA tensors only
    finite = torch.tensor([1.0 if params_finite(engine.module) else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item() < 1:
        raise FloatingPointError(f"not saving step {step}: the model has non-finite weights; "
                                 f"the last good checkpoint in {ckpt_dir} is kept")
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # a partial folder left by an interrupted save of the same step
        shutil.rmtree(folder)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=not frozen)
    torch.save(rank_state, folder / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(client, folder / "client.pt")
    barrier()
    if rank == 0:
        _write_atomic(folder / MARKER, json.dumps({"step": step, "world": _world()}))
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            if old != folder:  # never the one just written
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def load_checkpoint(engine, folder: Path, rank: int, frozen: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load engine state (weights + optimizer) and return (client state, this rank's state)."""
    meta = json.loads((folder / MARKER).read_text())
    if meta.get("world") != _world():
        raise RuntimeError(f"checkpoint {folder} was written by {meta.get('world')} ranks, this run has {_world()}: "
                           "exact resume needs the same world size")
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=frozen)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    client = torch.load(folder / "client.pt", map_location="cpu", weights_only=True)
    rank_state = torch.load(folder / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    return client, rank_state


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

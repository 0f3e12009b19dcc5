"""Build a rank's training loader for the configured backend (`data.backend`).

The trainer only sees an object that iterates `Batch`es forever and has
`state_dict()/load_state_dict()/skipped`; which backend produced them does not matter to it.
`cpu`: `data/loader.py` (skips and counts bad samples). `dali`: `data/dali/` (DALI cannot skip a bad
sample, so the shards must be validated first: `python -m data.validate`, or `data.validation=first_use`).
Both are called on every rank; the DALI preparation is collective (errors reach every rank).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data.loader import PretrainLoader, SampleProcessor
from data.shards import DataError


def build_train_loader(cfg, shards: list[str], processor: SampleProcessor, micro_batch: int, rank: int, world: int,
                       device_type: str):
    d = cfg.data
    if d.backend == "cpu":
        return PretrainLoader(shards, processor, micro_batch, cfg.seed, rank, world, d.workers, d.shuffle_buffer,
                              d.resampled, pin_memory=device_type == "cuda")
    if d.backend == "dali":
        return build_dali_loader(cfg, shards, processor, micro_batch, rank, world, device_type)
    raise ValueError(f"data.backend={d.backend!r} is not available (choose cpu or dali)")


def required_components(processor: SampleProcessor) -> tuple[str, ...]:
    return ("image", "text") if processor.text_encoder is not None else ("image",)


def build_dali_loader(cfg, shards: list[str], processor: SampleProcessor, micro_batch: int, rank: int, world: int,
                      device_type: str):
    from data.dali import require_dali
    from data.dali.loader import DaliLoader

    d = cfg.data
    require_dali()
    if d.resampled:
        raise DataError("data.resampled=true is not supported with data.backend=dali: DALI splits the samples (not "
                        "the tar files) over the ranks and reshuffles every epoch; set data.resampled=false")
    decoder = d.dali_decoder if d.dali_decoder != "auto" else ("mixed" if device_type == "cuda" else "cpu")
    if decoder == "mixed" and device_type != "cuda":
        raise DataError("data.dali_decoder=mixed decodes on the GPU, and this run has none: use data.dali_decoder=cpu")
    device_id = None
    if decoder == "mixed":
        import torch

        device_id = torch.cuda.current_device()
    indexes = prepare_dali_shards(shards, required_components(processor), d.validation, d.workers, d.dali_index_dir,
                                  rank, world, d.train)
    return DaliLoader(shards, indexes, processor, micro_batch, cfg.seed, rank, world, d.dali_threads or d.workers,
                      d.shuffle_buffer, decoder, device_id, d.dali_prefetch)


def prepare_dali_shards(shards: list[str], require: tuple[str, ...], mode: str, workers: int, index_dir: str,
                        rank: int, world: int, pattern: str) -> list[str]:
    """Collective: check (or, with mode=first_use, make) the validation record, then the DALI index files."""
    from data.dali.index import ensure_indexes
    from data.validate import unvalidated
    from train.distributed import run_on_main

    missing = run_on_main(unvalidated, shards, require)
    flawed = [(s, why) for s, why in missing if why.startswith("has problems")]
    if flawed or (missing and mode != "first_use"):
        raise DataError(_refusal(missing, flawed, require, pattern))
    if missing:
        _validate_on_first_use([s for s, _ in missing], require, workers, rank, world, pattern)
    return run_on_main(ensure_indexes, shards, index_dir)


def _refusal(missing: list[tuple[str, str]], flawed: list[tuple[str, str]], require: tuple[str, ...],
             pattern: str) -> str:
    shard, why = (flawed or missing)[0]
    command = f"python -m data.validate '{pattern}' --require {','.join(require)}"
    if flawed:
        return (f"data.backend=dali cannot skip bad samples and {len(flawed)} shard(s) have some (e.g. {shard}: "
                f"{why.removeprefix('has problems: ')}): write clean copies with `{command} --rewrite OUT_DIR` and "
                f"train on them, or use data.backend=cpu (skips and counts them)")
    return (f"data.backend=dali needs validated shards and {len(missing)} shard(s) are not (e.g. {shard}: {why}): run "
            f"`{command}` first (add --rewrite OUT_DIR for clean copies), or set data.validation=first_use")


def _validate_on_first_use(todo: list[str], require: tuple[str, ...], workers: int, rank: int, world: int,
                           pattern: str) -> None:
    """Every rank validates its share of `todo`; rank 0 records the results; bad data stops every rank."""
    from data.validate import REPORT, summary, validate_shards, write_outputs
    from train.distributed import run_on_main

    log = logging.getLogger("clipdino.data")
    if rank == 0:
        log.warning("validating %d shard(s) on first use (data.validation=first_use), split over %d rank(s)",
                    len(todo), world)
    try:
        mine: Any = validate_shards(todo[rank::world], require, max(workers, 1))
    except Exception as e:  # reported on every rank below, instead of a hang at the gather
        mine = f"rank {rank}: {type(e).__name__}: {e}"
    gathered = _all_gather(mine)
    errors = [g for g in gathered if isinstance(g, str)]
    if errors:
        raise DataError(f"validation on first use failed: {errors[0]}")
    order = {shard: i for i, shard in enumerate(todo)}
    results = sorted((r for part in gathered for r in part), key=lambda r: order[r["shard"]])
    report_path = Path(todo[0]).parent / REPORT
    report = run_on_main(write_outputs, results, report_path, None)
    if report["problems"] or report["clean"] < report["samples"]:
        first = summary(report, show=3).replace("\n", ";")
        raise DataError(f"data.validation=first_use found bad data ({first}); report: {report_path}. data.backend=dali "
                        f"cannot skip it: write clean copies with `python -m data.validate '{pattern}' --require "
                        f"{','.join(require)} --rewrite OUT_DIR` and train on them, or use data.backend=cpu")


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

"""The one training loop for every objective (DeepSpeed engine, CPU or GPU, 1..N ranks).

    summary = train(load_config("launch/configs/pretrain/tiny_clip.yaml", ["schedule.steps=20"]))

Per optimizer step: set LR / weight decay per group, run `grad_accum` micro-batches
(forward under bf16 autocast on GPU, fp32 on CPU; backward through the engine), step, let the
objective update its own state (EMA teacher), log, and checkpoint + export every
`checkpoint.every` steps. Non-finite losses are detected on all ranks together and skipped or halt.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train import checkpoint as ckpt
from train.config import PretrainConfig
from train.config_loader import save_config, to_dict
from train.deepspeed_config import build_deepspeed_config, resolve_batch
from train.distributed import barrier, init_distributed, run_on_main
from train.metrics import MetricsLogger
from train.mfu import peak_flops, peak_memory_bytes
from train.objectives.registry import objective_class
from train.optim import build_adamw, clip_gradients_per_param, lr_at, param_groups, steps_for, weight_decay_at


class NonFiniteLossError(FloatingPointError):
    pass


def resolve_steps(cfg: PretrainConfig, samples_per_epoch: int) -> tuple[int, int, int]:
    """(total steps, warm-up steps, steps per epoch) from the schedule config."""
    steps_per_epoch = max(samples_per_epoch // cfg.schedule.global_batch, 1)
    s = cfg.schedule
    if s.steps is not None:
        total = s.steps
    elif s.epochs is not None:
        total = math.ceil(s.epochs * steps_per_epoch)
    else:
        raise ValueError("set schedule.steps or schedule.epochs")
    if total < 1:
        raise ValueError(f"schedule gives {total} steps; need at least 1")
    warmup = (s.warmup_steps if s.warmup_steps is not None
              else steps_for(s.warmup_samples, s.warmup_epochs, steps_per_epoch, s.global_batch))
    return total, min(warmup, total), steps_per_epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: PretrainConfig) -> dict[str, Any]:  # or a VLMConfig (train/vlm_config.py): the same trainer sections
    dist = init_distributed()
    import deepspeed

    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    objective_cls = objective_class(cfg)  # the objective owns its data: creates, counts and loads it
    run_on_main(objective_cls.prepare_data, cfg)

    # ---------------------------------------------------------------- data size, batch, schedule
    samples_per_epoch = cfg.data.samples_per_epoch or run_on_main(objective_cls.count_samples, cfg)
    micro, accum = resolve_batch(cfg.schedule.global_batch, cfg.schedule.micro_batch, dist.world)
    total_steps, warmup_steps, steps_per_epoch = resolve_steps(cfg, samples_per_epoch)
    precision = "bf16" if cfg.deepspeed.precision == "auto" and dist.device.type == "cuda" else cfg.deepspeed.precision
    precision = "fp32" if precision == "auto" else precision

    # ---------------------------------------------------------------- model, optimizer, engine
    resume_from = ckpt.find_resume_checkpoint(cfg.resume, run_dir / "checkpoints")
    seed_everything(cfg.seed)  # identical initial weights (and EMA teacher) on every rank
    objective = objective_cls(cfg, steps_per_epoch, total_steps)
    if getattr(cfg.model, "init_from", "") and resume_from is None:  # a resumed run's checkpoint wins
        objective.init_vision_from(cfg.model.init_from)
    objective.configure_grad_checkpointing()
    objective.to(dist.device)
    groups = param_groups(objective.student, cfg.optim.weight_decay, objective.no_weight_decay_names(),
                          objective.group_of)
    optimizer = build_adamw(groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps)
    n_params = sum(p.numel() for p in objective.student.parameters())  # before ZeRO-3 partitions them
    n_trained = sum(p.numel() for g in groups for p in g["params"])
    ds_config = build_deepspeed_config(cfg, micro, accum, dist.world, objective)
    engine, optimizer, _, _ = deepspeed.initialize(model=objective.student, optimizer=optimizer, config=ds_config,
                                                   dist_init_required=False)
    seed_everything(cfg.seed * 1000 + dist.rank + 1)  # per-rank stream (drop path, ...)

    loader = objective.build_loader(micro, accum, dist.rank, dist.world, dist.device.type)

    # ---------------------------------------------------------------- resume
    start_step, samples_seen, nonfinite_total = 0, 0, 0
    if resume_from is not None:
        client, rank_state = ckpt.load_checkpoint(engine, resume_from, dist.rank, objective.checkpoint_frozen)
        objective.load_state_dict(client["objective"])
        loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])
        start_step, samples_seen, nonfinite_total = client["step"], client["samples_seen"], client["nonfinite_total"]
        if dist.is_main and cfg.resume != "auto":  # rolled back: newer checkpoints and exports are another line's
            moved = ckpt.set_aside_newer(run_dir / "checkpoints", start_step)
            exports = ckpt.set_aside_newer(run_dir / "export", start_step, complete_only=False)
            for folder in moved + exports:
                print(f"[clipdino] resumed from step {start_step}: set aside {folder.parent.name}/{folder.name}",
                      flush=True)
            if exports:
                from eval.watcher import forget_evaluations

                forget_evaluations(run_dir, [f"step_{f.name.split('_')[2]}" for f in exports])
        barrier()

    config_dict = to_dict(cfg)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg, total_steps, start_step, dist.is_main, config_dict)
    watcher = None
    if cfg.eval.watch:  # a separate process (rank 0's) evaluates each export as it appears (eval/watcher.py)
        from eval.watcher import watch_from_config

        watcher = watch_from_config(cfg, run_dir, logger.write, start=dist.is_main)  # checks on every rank
    flops_per_sample = objective.flops_per_sample()
    peak, peak_source = peak_flops(dist.device, precision, cfg.logging.peak_flops)
    per_sample = f"{flops_per_sample / 1e9:.2f} GFLOP/sample, " if flops_per_sample else ""  # VLM: per step, by tokens
    logger.write(f"[clipdino] {cfg.objective.name}: {n_params / 1e6:.2f}M student params ({n_trained / 1e6:.2f}M "
                 f"trained), {dist.world} rank(s) on {dist.device.type}, {precision}, global batch "
                 f"{cfg.schedule.global_batch} = {micro} x {dist.world} x {accum}, {total_steps} steps "
                 f"({steps_per_epoch}/epoch), {per_sample}peak {peak / 1e12:.3f} TFLOP/s/device ({peak_source})"
                 + (f", resumed from {resume_from}" if resume_from else ""))

    def save(step: int) -> None:
        client = {"step": step, "samples_seen": samples_seen, "nonfinite_total": nonfinite_total,
                  "objective": objective.state_dict()}
        rank_state = {"rng": ckpt.rng_state(), "data": loader.state_dict()}
        folder = ckpt.save_checkpoint(engine, run_dir / "checkpoints", step, dist.rank, client, rank_state,
                                      cfg.checkpoint.keep, objective.checkpoint_frozen)
        if cfg.checkpoint.export:
            meta = {"step": step, "samples_seen": samples_seen, "objective": cfg.objective.name,
                    "run_dir": str(run_dir), "checkpoint": str(folder)}
            objective.write_export(engine, run_dir / "export" / ckpt.tag_for(step), meta, cfg.deepspeed.zero_stage,
                                   dist.is_main)  # collective under ZeRO-3
        barrier()

    # ---------------------------------------------------------------- loop
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and dist.device.type == "cuda"
                else contextlib.nullcontext())
    batches = iter(loader)
    per_param_clip = getattr(cfg.optim, "clip_mode", "global") == "per_param" and cfg.optim.grad_clip > 0
    nonfinite_in_a_row = 0
    last_saved = start_step if resume_from is not None else -1
    try:
        for step in range(start_step, total_steps):
            t_step = time.perf_counter()
            lr = lr_at(step, total_steps, warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
            wd = weight_decay_at(step, total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
            for group in engine.optimizer.param_groups:
                scale = objective.lr_scale(group["name"], step)
                group["lr"] = lr * scale
                group["held"] = scale == 0.0  # left out of the step: Adam's state untouched (optim.skip_held_groups)
                group["weight_decay"] = wd if group["apply_decay"] else 0.0

            data_wait, terms_sum, finite_step = 0.0, {}, True
            for _ in range(accum):
                t0 = time.perf_counter()
                batch = next(batches).to(dist.device)
                data_wait += time.perf_counter() - t0
                with autocast:
                    terms = objective.compute_loss(engine, batch, step)
                finite = _all_ranks_finite(terms["loss"])
                finite_step &= finite
                if finite:
                    engine.backward(terms["loss"])
                elif accum > 1:
                    engine.backward(_zero_loss(engine.module))  # keep DeepSpeed's micro-step bookkeeping intact
                if finite or accum > 1:
                    if per_param_clip and engine.is_gradient_accumulation_boundary():  # grads all-reduced (stage 0)
                        clip_gradients_per_param(engine.module.parameters(), cfg.optim.grad_clip)
                    if not finite_step and engine.is_gradient_accumulation_boundary():
                        for group in engine.optimizer.param_groups:  # parameters stay unchanged this step
                            group["lr"] = 0.0
                    engine.step()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float()
            samples_seen += cfg.schedule.global_batch

            if finite_step:
                nonfinite_in_a_row = 0
                after = objective.after_step(step)
            else:
                objective.skip_step(step)
                nonfinite_total += 1
                nonfinite_in_a_row += 1
                after = {}
                message = (f"non-finite loss at step {step + 1} on at least one rank "
                           f"({nonfinite_in_a_row} in a row, {nonfinite_total} in total)")
                if cfg.nonfinite == "halt":
                    raise NonFiniteLossError(message + "; nonfinite=halt. The last good checkpoint is kept.")
                if nonfinite_in_a_row >= cfg.nonfinite_patience:
                    raise NonFiniteLossError(message + f"; stopping after {cfg.nonfinite_patience} in a row "
                                             "(nonfinite_patience). The last good checkpoint is kept.")
                logger.write(f"[clipdino] {message}: update skipped")

            step_time = time.perf_counter() - t_step
            done = step + 1
            if done % cfg.logging.every == 0 or done == total_steps:
                row = _metrics_row(done, terms_sum, accum, lr, wd, step_time, data_wait, cfg.schedule.global_batch,
                                   objective, peak, dist, samples_seen, after, not finite_step, nonfinite_total)
                row["data/skipped"] = sum(loader.skipped.values())
                logger.log(row)
            stopping = done == cfg.schedule.stop_after and done < total_steps
            # a skipped step left the weights as they were: stopping still saves them (nothing since the last save is lost)
            if (finite_step and cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or stopping:
                save(done)
                last_saved = done
            if stopping:
                logger.write(f"[clipdino] stopping after step {done} (schedule.stop_after); continue with resume=auto")
                break
        else:
            if cfg.checkpoint.at_end and last_saved != total_steps:
                save(total_steps)
    finally:
        logger.close()
        if watcher is not None:
            watcher.finish()  # it evaluates the remaining exports (the final one too), then exits
    if dist.is_main and (run_dir / "metrics.jsonl").exists():
        from train.plots import plot_loss

        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", f"{cfg.objective.name} ({run_dir.name})")
    barrier()
    return {"run_dir": str(run_dir), "steps": total_steps, "samples_seen": samples_seen,
            "nonfinite_total": nonfinite_total, "data_skipped": dict(loader.skipped)}


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def _metrics_row(step, terms_sum, accum, lr, wd, step_time, data_wait, global_batch, objective, peak, dist,
                 samples_seen, after, skipped, nonfinite_total) -> dict[str, Any]:
    """Loss terms: the mean over micro-batches and ranks; "count/..." terms: the sum (tokens of the step)."""
    keys = sorted(terms_sum)
    values = torch.stack([(terms_sum[k] / accum).detach().float().to(dist.device) for k in keys])  # (terms,)
    if torch.distributed.is_initialized() and dist.world > 1:
        torch.distributed.all_reduce(values)
        values = values / dist.world
    values = values.cpu()  # the one host sync of the row
    row: dict[str, Any] = {"step": step}
    row.update({k: float(v) * (accum * dist.world if k.startswith("count/") else 1) for k, v in zip(keys, values)})
    counts = {k: v for k, v in row.items() if k.startswith("count/")}
    samples_per_s = global_batch / step_time
    achieved = objective.flops_per_step(counts, global_batch) / step_time / dist.world  # per device
    if "count/input_tokens" in counts:
        row["tokens_per_s"] = counts["count/input_tokens"] / step_time
    if "count/tokens" in counts:
        row["supervised_tokens_per_s"] = counts["count/tokens"] / step_time
    row.update({"lr": lr, "weight_decay": wd, "samples_per_s": samples_per_s, "step_time_s": step_time,
                "data_wait_s": data_wait, "flops_per_s_per_device": achieved,
                "mfu": achieved / peak if peak else None, "peak_mem_bytes": peak_memory_bytes(dist.device),
                "samples_seen": samples_seen, "skipped_update": skipped, "nonfinite_total": nonfinite_total})
    row.update({k: float(v) for k, v in after.items()})
    return row


"""The one training loop for every objective (DeepSpeed engine, CPU or GPU, 1..N ranks).

    summary = train(load_config("launch/configs/pretrain/tiny_clip.yaml", ["schedule.steps=20"]))

Per optimizer step: set LR / weight decay per group, run `grad_accum` micro-batches
(forward under bf16 autocast on GPU, fp32 on CPU; backward through the engine), step, let the
objective update its own state (EMA teacher), log, and checkpoint + export every
`checkpoint.every` steps. Batches reach the device through `DevicePrefetcher` (train/prefetch.py).

Non-finite losses (and gradients) are detected on all ranks together, on the device: each micro-batch adds
`!isfinite(loss)` to a device-side count, and at the accumulation boundary that count (plus, at ZeRO 0, a
gradient-finiteness flag, and the loss terms on a logged step) is all-reduced and copied to the host once: the
loop's one host sync per optimizer step (docs/architecture.md, "Host syncs per step"). A bad step marks every
parameter group held, so `engine.step()` leaves weights and Adam state exactly as they were; then it is skipped
(counted, no after_step, no checkpoint) or halts the run.
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
from train.compile import compile_blocks
from train.config import PretrainConfig
from train.config_loader import save_config, to_dict
from train.deepspeed_config import build_deepspeed_config, resolve_batch
from train.distributed import barrier, init_distributed, run_on_main
from train.metrics import MetricsLogger
from train.mfu import peak_flops, peak_memory_bytes
from train.objectives.registry import objective_class
from train.optim import build_adamw, clip_gradients_per_param, lr_at, param_groups, steps_for, weight_decay_at
from train.prefetch import DevicePrefetcher


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
    compile_blocks(objective, dist.device.type)  # model.compile=true: torch.compile per transformer block
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
        rank_state = {"rng": ckpt.rng_state(), "data": batches.state_dict()}  # refuses if a batch is held ahead
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
    batches = DevicePrefetcher(loader, dist.device)
    per_param_clip = getattr(cfg.optim, "clip_mode", "global") == "per_param" and cfg.optim.grad_clip > 0
    check_grads = engine.zero_optimization_stage() == 0  # ZeRO 1-3 reject a non-finite gradient norm in step()
    nonfinite_in_a_row = 0
    last_saved = start_step if resume_from is not None else -1
    try:
        for step in range(start_step, total_steps):
            t_step = time.perf_counter()
            done = step + 1
            logged = done % cfg.logging.every == 0 or done == total_steps
            stopping = done == cfg.schedule.stop_after and done < total_steps
            may_save = (stopping or done == total_steps
                        or bool(cfg.checkpoint.every and done % cfg.checkpoint.every == 0))
            lr = lr_at(step, total_steps, warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
            wd = weight_decay_at(step, total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
            for group in engine.optimizer.param_groups:
                scale = objective.lr_scale(group["name"], step)
                group["lr"] = lr * scale
                group["held"] = scale == 0.0  # left out of the step: Adam's state untouched (optim.skip_held_groups)
                group["weight_decay"] = wd if group["apply_decay"] else 0.0

            batches.reset_wait()
            terms_sum: dict[str, torch.Tensor] = {}
            bad_losses = torch.zeros((), device=dist.device)  # non-finite losses this step, counted on the device
            health = (0.0, 0.0, {})
            for micro_step in range(accum):
                # nothing held ahead across a possible checkpoint: the saved data position is exact
                batch = batches.next(ahead=not (micro_step == accum - 1 and may_save))
                with autocast:
                    terms = objective.compute_loss(engine, batch, step)
                bad_losses += (~torch.isfinite(terms["loss"].detach())).float()
                engine.backward(terms["loss"])  # always: the bookkeeping stays DeepSpeed's; a bad step is held below
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float()
                if engine.is_gradient_accumulation_boundary():
                    if per_param_clip:  # grads all-reduced (stage 0)
                        clip_gradients_per_param(engine.module.parameters(), cfg.optim.grad_clip)
                    bad_grads = _nonfinite_grads(engine.module) if check_grads else None
                    health = _step_health(bad_losses, bad_grads, terms_sum if logged else {}, accum, dist)
                    if health[0] or health[1]:
                        for group in engine.optimizer.param_groups:  # weights, moments and step counts untouched
                            group["held"] = True
                engine.step()
            bad_loss, bad_grad, values = health[0] > 0, health[1] > 0, health[2]
            bad_grad = bad_grad or (not bad_loss and not engine.was_step_applied())  # ZeRO 1-3: its own norm check
            finite_step = not (bad_loss or bad_grad)
            samples_seen += cfg.schedule.global_batch

            if finite_step:
                nonfinite_in_a_row = 0
                after = objective.after_step(step)
            else:
                objective.skip_step(step)
                nonfinite_total += 1
                nonfinite_in_a_row += 1
                after = {}
                message = (f"non-finite {'loss' if bad_loss else 'gradients'} at step {step + 1} on at least one "
                           f"rank ({nonfinite_in_a_row} in a row, {nonfinite_total} in total)")
                if cfg.nonfinite == "halt":
                    raise NonFiniteLossError(message + "; nonfinite=halt. The last good checkpoint is kept.")
                if nonfinite_in_a_row >= cfg.nonfinite_patience:
                    raise NonFiniteLossError(message + f"; stopping after {cfg.nonfinite_patience} in a row "
                                             "(nonfinite_patience). The last good checkpoint is kept.")
                logger.write(f"[clipdino] {message}: update skipped")

            step_time = time.perf_counter() - t_step  # host time; with one sync per step it tracks the device's
            if logged:
                row = _metrics_row(done, values, accum, lr, wd, step_time, batches.wait_s(),
                                   cfg.schedule.global_batch, objective, peak, dist, samples_seen, after,
                                   not finite_step, nonfinite_total)
                row["data/skipped"] = sum(loader.skipped.values())
                logger.log(row)
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


def _nonfinite_grads(module: torch.nn.Module) -> torch.Tensor:
    """1.0 if any gradient holds inf / NaN (ZeRO 0: whole, all-reduced gradients in `p.grad`), on the device."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(module.parameters()).device)
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()


def _step_health(bad_losses: torch.Tensor, bad_grads: torch.Tensor | None, terms_sum: dict[str, torch.Tensor],
                 accum: int, dist) -> tuple[float, float, dict[str, float]]:
    """The step's one host sync: (non-finite losses, non-finite gradients, loss terms) summed over ranks and copied
    to the host together. Terms only on logged steps: the mean over micro-batches and ranks."""
    keys = sorted(terms_sum)
    flags = torch.stack([bad_losses.float(), bad_grads.float() if bad_grads is not None else torch.zeros_like(
        bad_losses, dtype=torch.float32)])  # (2,)
    packed = torch.cat([flags] + [(terms_sum[k] / accum).detach().float().reshape(1).to(flags.device)
                                  for k in keys])  # (2 + terms,)
    if torch.distributed.is_initialized() and dist.world > 1:
        torch.distributed.all_reduce(packed)
        packed[2:] /= dist.world
    values = packed.tolist()  # the sync
    return values[0], values[1], dict(zip(keys, values[2:]))


def _metrics_row(step, values, accum, lr, wd, step_time, data_wait, global_batch, objective, peak, dist,
                 samples_seen, after, skipped, nonfinite_total) -> dict[str, Any]:
    """Loss terms (`values`, from `_step_health`): the mean over micro-batches and ranks; "count/..." terms: the sum
    (tokens of the step)."""
    row: dict[str, Any] = {"step": step}
    row.update({k: v * (accum * dist.world if k.startswith("count/") else 1) for k, v in values.items()})
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

"""End-to-end pretraining through the real entry point: 1 process and 2 DeepSpeed CPU ranks, exact resume."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from models.export import load_export
from train.plots import read_jsonl

pytestmark = pytest.mark.distributed
CONFIGS = REPO / "launch" / "configs" / "pretrain"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(objective: str, overrides: list[str], ranks: int = 1, expect_ok: bool = True):
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # in-process tests may have set them
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    script = [str(REPO / "launch" / "pretrain.py"), "--config", str(CONFIGS / f"tiny_{objective}.yaml"), *overrides]
    port = free_port()
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
               *script]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    # DeepSpeed's CPU all-reduce buffers (67 MB each, in RAM) are gone once the ranks exit
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("objective", ["clip", "dino"])
def test_resume_reproduces_the_straight_run(objective, ranks, tiny_world, tmp_path):
    """6 steps straight vs 3 steps, stop, resume=auto, 3 more: identical per-step losses (bitwise, fp32 CPU)."""
    common = ["schedule.steps=6", "checkpoint.every=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(objective, tiny_overrides(tiny_world, straight, *common), ranks)
    pretrain(objective, tiny_overrides(tiny_world, split, *common, "schedule.stop_after=3"), ranks)
    assert sorted(losses(split)) == [1, 2, 3]
    assert (split / "checkpoints" / "step_0000003" / "COMPLETE").is_file()
    pretrain(objective, tiny_overrides(tiny_world, split, *common, "resume=auto"), ranks)
    a, b = losses(straight), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in a.values())
    assert b == a, f"straight {a}\nresumed  {b}"
    # the exported encoders agree too
    ea, _ = load_export(straight / "export" / "step_0000006")
    eb, _ = load_export(split / "export" / "step_0000006")
    assert all(torch.equal(x, y) for x, y in zip(ea.state_dict().values(), eb.state_dict().values()))


@pytest.mark.parametrize("objective,zero_stage", [("siglip", 2), ("clip_frozen_text", 0), ("hybrid", 1), ("clip", 3)])
def test_two_rank_deepspeed_run(objective, zero_stage, tiny_world, tmp_path):
    run_dir = tmp_path / objective
    # the logit scale starts above its bound, so the post-step clamp runs on every rank, ZeRO-3's empty padded
    # partition of the 1-element parameter included
    pretrain(objective, tiny_overrides(tiny_world, run_dir, "schedule.steps=3", "checkpoint.every=0",
                                       f"deepspeed.zero_stage={zero_stage}", "loss.init_logit_scale=5.0",
                                       "loss.siglip_init_logit_scale=5.0"), ranks=2)
    check_run_folder(run_dir, steps=3, kind="clip")
    model, _ = load_export(run_dir / "export" / "step_0000003")
    assert model.logit_scale.item() <= math.log(100.0) + 1e-6


def test_zero3_refused_with_an_ema_teacher(tiny_world, tmp_path):
    out = pretrain("dino", tiny_overrides(tiny_world, tmp_path / "r", "deepspeed.zero_stage=3"), expect_ok=False)
    assert out.returncode == 1 and "zero_stage=3 is not supported for objective dino" in out.stderr


def check_run_folder(run_dir: Path, steps: int, kind: str):
    """The run-folder contract users and the eval harness rely on."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("step", "loss", "lr", "samples_per_s", "data_wait_s", "mfu", "peak_mem_bytes", "flops_per_s_per_device"):
        assert key in rows[-1], key
    assert (run_dir / "config.yaml").is_file() and (run_dir / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts[-1] == f"step_{steps:07d}"
    export = run_dir / "export" / f"step_{steps:07d}"
    model, config = load_export(export)
    assert config["kind"] == kind and config["meta"]["step"] == steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_single_process_run_folder_and_dino_export(tiny_world, tmp_path):
    run_dir = tmp_path / "dino"
    out = pretrain("dino", tiny_overrides(tiny_world, run_dir, "schedule.steps=4", "checkpoint.every=2",
                                          "checkpoint.keep=1"))
    assert "done: 4 steps" in out.stdout
    check_run_folder(run_dir, steps=4, kind="vit")
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_0000004"]  # keep=1
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["step_0000002", "step_0000004"]
    cfg = json.loads((run_dir / "export" / "step_0000004" / "config.json").read_text())
    assert cfg["vision"]["size"] == "micro" and cfg["meta"]["objective"] == "dino"


def test_bad_input_gives_one_line_errors(tiny_world, tmp_path):
    out = pretrain("clip", tiny_overrides(tiny_world, tmp_path / "r", "optim.lrr=1"), expect_ok=False)
    assert out.returncode == 2 and "did you mean 'optim.lr'" in out.stderr and "Traceback" not in out.stderr
    out = pretrain("clip", tiny_overrides(tiny_world, tmp_path / "r", f"data.train={tmp_path}/none-*.tar"),
                   expect_ok=False)
    assert out.returncode == 1 and "no shards match" in out.stderr and "Traceback" not in out.stderr
    out = pretrain("clip", tiny_overrides(tiny_world, tmp_path / "r", "resume=/nonexistent/ckpt"), expect_ok=False)
    assert out.returncode == 1 and "not a complete checkpoint" in out.stderr

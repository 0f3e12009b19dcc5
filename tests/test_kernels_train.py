"""The trainer, in-process on one CPU rank, with ``loss.impl=triton``: the fused kernels run in Triton's
interpreter inside real training steps of every objective, and give the losses of ``loss.impl=torch``."""
from __future__ import annotations

import os

import pytest

from conftest import tiny_overrides
from kernels.triton_runtime import LAUNCHES, triton_installed, use_interpreter
from train.config_loader import load_config
from train.plots import read_jsonl
from train.trainer import train

KERNELS = {"clip": ("pairwise_forward",), "siglip": ("pairwise_forward",), "dino": ("dino_forward",),
           "hybrid": ("pairwise_forward", "dino_forward")}


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    if not triton_installed():
        pytest.skip("triton is not installed")
    saved = dict(os.environ)  # train() sets RANK, MASTER_PORT, ...: later launcher tests must not inherit them
    use_interpreter()  # before triton is first imported
    yield
    os.environ.clear()
    os.environ.update(saved)


def run(world, run_dir, objective: str, impl: str) -> list[float]:
    cfg = load_config(f"launch/configs/pretrain/tiny_{objective}.yaml",
                      tiny_overrides(world, run_dir, "data.workers=1", "schedule.steps=2", "checkpoint.every=0",
                                     f"loss.impl={impl}"))
    train(cfg)
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("objective", ["clip", "siglip", "dino", "hybrid"])
def test_trainer_runs_the_fused_kernels(objective: str, tiny_world, tmp_path) -> None:
    before = {name: LAUNCHES[name] for name in ("pairwise_backward_rows", "dino_backward", *KERNELS[objective])}
    fused = run(tiny_world, tmp_path / "triton", objective, "triton")
    for name in KERNELS[objective]:
        assert LAUNCHES[name] > before[name], f"{name} did not run"
    backward = "dino_backward" if objective == "dino" else "pairwise_backward_rows"
    assert LAUNCHES[backward] > before[backward]
    reference = run(tiny_world, tmp_path / "torch", objective, "torch")
    assert len(fused) == len(reference) == 2
    for got, want in zip(fused, reference):  # step 2 also checks the gradients that step 1 applied
        assert abs(got - want) <= 1e-4 * abs(want), (fused, reference)

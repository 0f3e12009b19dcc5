"""Two gloo ranks running the fused kernels (Triton's CPU interpreter) vs one process on the global batch.

Same contract as tests/test_losses_distributed.py (see its docstring for why a rank's feature gradient is
world_size x the single-process one): the mean of the ranks' losses is the global loss, each rank's feature
gradients are W x its rows of the global gradient, scalar gradients average to the global ones, and both
ranks hold the same DINO centre. Inputs are fp32 on the ranks; the single-process reference is fp64.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from kernels.triton_runtime import triton_installed  # imports no triton: the ranks set TRITON_INTERPRET first
from test_losses_distributed import BATCH, K, MOMENTUM, N_CROPS, N_GLOBAL, STUDENT_TEMP, TEACHER_TEMPS, WORLD, \
    crop_major_rows, make_global_inputs, run_losses

pytestmark = pytest.mark.distributed


def run_fused_losses(inputs: dict, rows: slice) -> dict[str, object]:
    """The fused modules on fp32 copies of one rank's rows; same outputs as run_losses."""
    from train.losses.clip_loss import ClipLoss
    from train.losses.dino_loss import DINOLoss
    from train.losses.siglip_loss import SigLipLoss

    out: dict[str, object] = {}
    f32 = {k: (v.float() if isinstance(v, Tensor) else [x.float() for x in v]) for k, v in inputs.items()}
    img, txt = f32["image"][rows].clone().requires_grad_(), f32["text"][rows].clone().requires_grad_()
    scale = f32["scale"].clone().requires_grad_()
    loss = ClipLoss(impl="triton")(img, txt, scale)
    loss.backward()
    out["clip"] = (loss.detach(), img.grad, txt.grad, scale.grad)
    img, txt = f32["image"][rows].clone().requires_grad_(), f32["text"][rows].clone().requires_grad_()
    scale, bias = f32["scale"].clone().requires_grad_(), f32["bias"].clone().requires_grad_()
    loss = SigLipLoss(impl="triton")(img, txt, scale, bias)
    loss.backward()
    out["siglip"] = (loss.detach(), img.grad, txt.grad, scale.grad, bias.grad)
    dino = DINOLoss(K, n_global_crops=N_GLOBAL, student_temp=STUDENT_TEMP, center_momentum=MOMENTUM, impl="triton")
    for step, temp in enumerate(TEACHER_TEMPS):
        student = crop_major_rows(f32["student"][step], N_CROPS, rows).clone().requires_grad_()
        loss = dino(student, crop_major_rows(f32["teacher"][step], N_GLOBAL, rows), temp)
        loss.backward()
        out[f"dino{step}"] = (loss.detach(), student.grad, dino.center.clone())
    return out


def _worker(rank_id: int, init_method: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton in this process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank_id, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        from kernels.triton_runtime import LAUNCHES

        results = run_fused_losses(make_global_inputs(), slice(rank_id * BATCH, (rank_id + 1) * BATCH))
        results["launches"] = dict(LAUNCHES)
        torch.save(results, Path(out_dir) / f"rank{rank_id}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    if not triton_installed():
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("kernels_dist")
    mp.spawn(_worker, args=(f"file://{tmp / 'pg_init'}", str(tmp)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return per_rank, run_losses(make_global_inputs(), slice(None))  # fp64 reference modules


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_every_kernel_ran_on_both_ranks(runs) -> None:
    for result in runs[0]:
        for name in ("pairwise_forward", "pairwise_backward_rows", "pairwise_backward_cols", "dino_forward",
                     "dino_backward"):
            assert result["launches"].get(name, 0) > 0, name


@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_contrastive_two_ranks_match_global_batch(runs, key: str) -> None:
    per_rank, single = runs
    assert _rel(torch.stack([r[key][0] for r in per_rank]).mean(), single[key][0]) < 1e-5
    for r, result in enumerate(per_rank):
        rows = slice(r * BATCH, (r + 1) * BATCH)
        for got, want in zip(result[key][1:3], single[key][1:3]):
            assert _rel(got, WORLD * want[rows]) < 1e-5
    for i, want in enumerate(single[key][3:]):
        assert _rel(torch.stack([r[key][3 + i] for r in per_rank]).mean(), want) < 1e-5


def test_dino_two_ranks_match_global_batch(runs) -> None:
    per_rank, single = runs
    for step in range(len(TEACHER_TEMPS)):  # step 1 also checks that the updated centre is used
        key = f"dino{step}"
        loss_single, grad_single, center_single = single[key]
        assert _rel(torch.stack([r[key][0] for r in per_rank]).mean(), loss_single) < 1e-5
        for r, result in enumerate(per_rank):
            rows = slice(r * BATCH, (r + 1) * BATCH)
            assert _rel(result[key][1], WORLD * crop_major_rows(grad_single, N_CROPS, rows)) < 1e-5
        assert torch.equal(per_rank[0][key][2], per_rank[1][key][2])  # identical centre on both ranks
        assert _rel(per_rank[0][key][2], center_single) < 1e-6

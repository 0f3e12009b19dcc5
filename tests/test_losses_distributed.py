"""Two gloo ranks (torch.multiprocessing.spawn) vs the single-process loss on the global batch.

Why the feature gradient is world_size x the single-process one: rank r's loss L_r depends on the
features of *every* rank through the gather, and the gather's backward sums the contributions of all
ranks' losses onto the owner, so rank r's local feature gradient is d(sum_s L_s)/dx_r = W * d(L)/dx_r
with L = mean_s L_s, the global loss. Rank r's features depend only on its own copy of the weights, so
its parameter gradient is W * (its share of dL/dtheta); DDP / DeepSpeed *average* parameter gradients
over ranks, (1/W) * sum_r W * share_r = dL/dtheta, the global-batch gradient. Scalars that are not
gathered (logit_scale, logit_bias) get dL_r/ds on each rank, whose average is dL/ds.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from train.losses.clip_loss import ClipLoss
from train.losses.dino_loss import DINOLoss
from train.losses.distributed import gather_with_grad, rank, world_size
from train.losses.siglip_loss import SigLipLoss

pytestmark = pytest.mark.distributed

WORLD, BATCH, DIM, K, N_GLOBAL, N_CROPS = 2, 5, 13, 33, 2, 5
STUDENT_TEMP, TEACHER_TEMPS, MOMENTUM = 0.1, (0.04, 0.05), 0.9


def make_global_inputs() -> dict[str, Tensor]:
    """The global batch (identical in every process): features, scalars and DINO logits in fp64."""
    gen = torch.Generator().manual_seed(1234)
    n = WORLD * BATCH

    def unit(rows: int) -> Tensor:
        x = torch.randn(rows, DIM, generator=gen, dtype=torch.float64)
        return x / x.norm(dim=1, keepdim=True)  # (rows, DIM)

    return {
        "image": unit(n), "text": unit(n),  # (N, D)
        "scale": torch.tensor(14.3, dtype=torch.float64), "bias": torch.tensor(-10.0, dtype=torch.float64),
        "student": [3 * torch.randn(N_CROPS * n, K, generator=gen, dtype=torch.float64) for _ in TEACHER_TEMPS],
        "teacher": [3 * torch.randn(N_GLOBAL * n, K, generator=gen, dtype=torch.float64) for _ in TEACHER_TEMPS],
    }


def crop_major_rows(x: Tensor, n_crops: int, rows: slice) -> Tensor:
    """Rows of the images in ``rows`` from a crop-major (n_crops * N, K) tensor, still crop-major."""
    return x.view(n_crops, -1, x.shape[-1])[:, rows].reshape(-1, x.shape[-1])  # (n_crops * B, K)


def run_losses(inputs: dict[str, Tensor], rows: slice) -> dict[str, object]:
    """Losses and gradients for the images in ``rows``: one rank's share, or the whole batch in one process."""
    out: dict[str, object] = {}
    img = inputs["image"][rows].clone().requires_grad_()
    txt = inputs["text"][rows].clone().requires_grad_()
    scale = inputs["scale"].clone().requires_grad_()
    loss = ClipLoss()(img, txt, scale)
    loss.backward()
    out["clip"] = (loss.detach(), img.grad, txt.grad, scale.grad)

    img = inputs["image"][rows].clone().requires_grad_()
    txt = inputs["text"][rows].clone().requires_grad_()
    scale, bias = inputs["scale"].clone().requires_grad_(), inputs["bias"].clone().requires_grad_()
    loss = SigLipLoss()(img, txt, scale, bias)
    loss.backward()
    out["siglip"] = (loss.detach(), img.grad, txt.grad, scale.grad, bias.grad)

    dino = DINOLoss(K, n_global_crops=N_GLOBAL, student_temp=STUDENT_TEMP, center_momentum=MOMENTUM).double()
    for step, temp in enumerate(TEACHER_TEMPS):
        student = crop_major_rows(inputs["student"][step], N_CROPS, rows).clone().requires_grad_()
        loss = dino(student, crop_major_rows(inputs["teacher"][step], N_GLOBAL, rows), temp)
        loss.backward()
        out[f"dino{step}"] = (loss.detach(), student.grad, dino.center.clone())
    return out


def _worker(rank_id: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank_id, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        assert (world_size(), rank()) == (WORLD, rank_id)
        results = run_losses(make_global_inputs(), slice(rank_id * BATCH, (rank_id + 1) * BATCH))
        try:  # unequal local batches must fail loudly on every rank, not hang or mis-gather
            gather_with_grad(torch.zeros(BATCH + rank_id, DIM))
            results["size_error"] = None
        except ValueError as err:
            results["size_error"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank_id}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    """(per-rank results from the 2-process run, single-process results on the global batch)."""
    tmp = tmp_path_factory.mktemp("losses_dist")
    mp.spawn(_worker, args=(f"file://{tmp / 'pg_init'}", str(tmp)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return per_rank, run_losses(make_global_inputs(), slice(None))


def _close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def _check_contrastive(runs: tuple[list[dict], dict], key: str) -> None:
    per_rank, single = runs
    loss_single, *feature_grads_single = single[key][:3]
    scalar_grads_single = single[key][3:]
    assert _close(torch.stack([r[key][0] for r in per_rank]).mean(), loss_single)
    for r, result in enumerate(per_rank):
        rows = slice(r * BATCH, (r + 1) * BATCH)
        for got, want in zip(result[key][1:3], feature_grads_single):
            assert _close(got, WORLD * want[rows])  # see the module docstring
    for i, want in enumerate(scalar_grads_single):
        assert _close(torch.stack([r[key][3 + i] for r in per_rank]).mean(), want)


def test_clip_loss_two_ranks_match_global_batch(runs) -> None:
    _check_contrastive(runs, "clip")


def test_siglip_loss_two_ranks_match_global_batch(runs) -> None:
    _check_contrastive(runs, "siglip")


def test_dino_loss_two_ranks_match_global_batch(runs) -> None:
    per_rank, single = runs
    for step in range(len(TEACHER_TEMPS)):  # step 1 also checks that the updated centre is used
        key = f"dino{step}"
        loss_single, grad_single, center_single = single[key]
        assert _close(torch.stack([r[key][0] for r in per_rank]).mean(), loss_single)
        for r, result in enumerate(per_rank):
            rows = slice(r * BATCH, (r + 1) * BATCH)
            assert _close(result[key][1], WORLD * crop_major_rows(grad_single, N_CROPS, rows))
        assert torch.equal(per_rank[0][key][2], per_rank[1][key][2])  # identical centre on both ranks
        assert _close(per_rank[0][key][2], center_single)


def test_unequal_local_batches_raise_on_every_rank(runs) -> None:
    per_rank, _ = runs
    for result in per_rank:
        assert result["size_error"] is not None and "same local shape" in result["size_error"]

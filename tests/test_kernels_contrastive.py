"""Fused CLIP / SigLIP Triton kernels (run by Triton's CPU interpreter) against fp64 direct formulas.

Relative error (max abs error / max abs reference, as in test_losses.py) below 1e-5 for fp32 inputs and
1e-2 for bf16 inputs (reference: fp64 on the same bf16-rounded values), for the loss and every gradient.
Small tiles make several row / column / feature tiles with masked tails.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from kernels.contrastive_reference import clip_loss, siglip_loss
from kernels.contrastive_triton import clip_loss_triton
from kernels.siglip_triton import siglip_loss_triton
from kernels import triton_runtime
from kernels.triton_runtime import LAUNCHES, PairwiseBlocks, backend_for
from test_losses import _rel_err, _unit_rows, direct_clip, direct_siglip
from train.losses.clip_loss import ClipLoss
from train.losses.siglip_loss import SigLipLoss

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SMALL = PairwiseBlocks(m=16, n=16, k=16, d_out=16)
# (rows, feature dim, tiles): one partial tile; 3 x 3 tiles with 3 feature slices and 3 gradient slices;
# the default (GPU) tiles with a row tail
CASES = [(7, 13, SMALL), (37, 70, PairwiseBlocks(m=16, n=16, k=32, d_out=32)), (70, 32, PairwiseBlocks())]


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _leaves(dtype: torch.dtype, n: int, d: int, *scalars: float) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs in ``dtype`` with fp32 scalars, the same values in fp64), all requiring grad."""
    low = [_unit_rows(n, d, dtype).requires_grad_(), _unit_rows(n, d, dtype).requires_grad_()]
    low += [torch.tensor(v, requires_grad=True) for v in scalars]
    return low, [x.detach().double().requires_grad_() for x in low]


def _check(got: Tensor, got_leaves: list[Tensor], want: Tensor, want_leaves: list[Tensor], tol: float) -> None:
    assert got.dtype == torch.float32 and _rel_err(got, want) < tol
    for g, w, leaf in zip(torch.autograd.grad(got, got_leaves), torch.autograd.grad(want, want_leaves), got_leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert _rel_err(g, w) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,blocks", CASES)
def test_clip_fused_matches_fp64(dtype: torch.dtype, n: int, d: int, blocks: PairwiseBlocks) -> None:
    torch.manual_seed(n * 31 + d)
    for scale in (1.0, 100.0) if n == 7 else (14.3,):
        low, ref = _leaves(dtype, n, d, scale)
        before = LAUNCHES["pairwise_forward"]
        got = clip_loss_triton(low[0], low[1], low[0], low[1], low[2], 0, blocks)
        assert LAUNCHES["pairwise_forward"] == before + 2  # the kernels ran (image->text, text->image)
        _check(got, low, direct_clip(*ref), ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,blocks", CASES)
def test_siglip_fused_matches_fp64(dtype: torch.dtype, n: int, d: int, blocks: PairwiseBlocks) -> None:
    torch.manual_seed(n * 17 + d)
    for scale, bias in ((10.0, -10.0), (37.5, -3.2)) if n == 7 else ((10.0, -10.0),):
        low, ref = _leaves(dtype, n, d, scale, bias)
        got = siglip_loss_triton(low[0], low[1], low[2], low[3], 0, blocks)
        _check(got, low, direct_siglip(*ref), ref, TOL[dtype])


@pytest.mark.parametrize("world", [2, 3])
def test_local_rows_against_gathered_rows(world: int) -> None:
    """Rank-local calls (offset r * B) averaged over ranks == the global loss; slice gradients sum to it."""
    torch.manual_seed(world)
    batch, d, n = 7, 19, 7 * world
    low, ref = _leaves(torch.float32, n, d, 20.0, -4.0)
    img, txt, scale, bias = low
    slices = [slice(r * batch, (r + 1) * batch) for r in range(world)]
    clip = torch.stack([clip_loss_triton(img[s], txt[s], img, txt, scale, s.start, SMALL) for s in slices]).mean()
    _check(clip, low[:3], direct_clip(*ref[:3]), ref[:3], 1e-5)
    sig = torch.stack([siglip_loss_triton(img[s], txt, scale, bias, s.start, SMALL) for s in slices]).mean()
    _check(sig, low, direct_siglip(*ref), ref, 1e-5)


def test_only_scale_needs_grad_and_bad_offset() -> None:
    torch.manual_seed(3)
    img, txt = _unit_rows(9, 8, torch.float32), _unit_rows(9, 8, torch.float32)
    scale = torch.tensor(5.0, requires_grad=True)
    (g,) = torch.autograd.grad(clip_loss_triton(img, txt, img, txt, scale, 0, SMALL), scale)
    ref = [img.double(), txt.double(), scale.detach().double().requires_grad_()]
    (w,) = torch.autograd.grad(direct_clip(*ref), ref[2])
    assert _rel_err(g, w) < 1e-5
    with pytest.raises(ValueError, match="outside"):
        clip_loss_triton(img, txt, img, txt, scale, 3)
    with pytest.raises(ValueError, match="outside"):
        siglip_loss_triton(img, txt, scale, scale, 1)
    with pytest.raises(ValueError, match="9 local images but 8 local texts"):
        clip_loss_triton(img, txt[:8], img, txt[:8], scale, 0, SMALL)


def test_second_derivatives_are_refused() -> None:
    """The kernels' gradients carry no graph: create_graph=True must fail loudly, not drop the term."""
    torch.manual_seed(4)
    img = _unit_rows(7, 8, torch.float32).requires_grad_()
    txt = _unit_rows(7, 8, torch.float32)
    scale, bias = torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    for loss in (clip_loss_triton(img, txt, img, txt, scale, 0, SMALL), siglip_loss_triton(img, txt, scale, bias, 0, SMALL)):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, img, create_graph=True)


def test_modules_with_triton_impl_run_the_kernels() -> None:
    torch.manual_seed(4)
    img, txt = _unit_rows(12, 16, torch.float32), _unit_rows(12, 16, torch.float32)
    scale, bias = torch.tensor(14.3), torch.tensor(-10.0)
    before = LAUNCHES["pairwise_backward_cols"]
    clip_module, sig_module = ClipLoss(impl="triton"), SigLipLoss(impl="triton")
    assert clip_module.native_dtype and sig_module.native_dtype and not ClipLoss().native_dtype
    leaf = img.clone().requires_grad_()
    clip_module(leaf, txt, scale).backward()
    assert LAUNCHES["pairwise_backward_cols"] > before and leaf.grad is not None
    assert _rel_err(clip_module(img, txt, scale), clip_loss(img, txt, img, txt, scale, 0)) < 1e-6
    assert _rel_err(sig_module(img, txt, scale, bias), siglip_loss(img, txt, scale, bias, 0)) < 1e-6


def test_backend_selection_and_cpu_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """CPU + TRITON_INTERPRET=1 -> interpreter; CPU without it, or fp64 -> the reference, warned once."""
    torch.manual_seed(5)
    img, txt = _unit_rows(6, 8, torch.float32), _unit_rows(6, 8, torch.float32)
    scale, bias = torch.tensor(14.3), torch.tensor(-10.0)
    assert backend_for("pairwise_kernels", img, txt) == "interpreter"
    assert backend_for("pairwise_kernels", img.double(), txt.double()) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(triton_runtime, "_warned", set())  # forget earlier warnings: count this test's
    launches = sum(LAUNCHES.values())
    with caplog.at_level(logging.WARNING, logger="clipdino.kernels"):
        assert backend_for("pairwise_kernels", img, txt) is None
        for _ in range(2):
            assert torch.equal(clip_loss_triton(img, txt, img, txt, scale, 0), clip_loss(img, txt, img, txt, scale, 0))
            assert torch.equal(siglip_loss_triton(img, txt, scale, bias, 0), siglip_loss(img, txt, scale, bias, 0))
        low = img.bfloat16()  # the fallback computes in fp32, like the trainer's torch path
        assert torch.equal(clip_loss_triton(low, low, low, low, scale, 0), clip_loss(*[low.float()] * 4, scale, 0))
    assert sum(LAUNCHES.values()) == launches
    messages = [r.getMessage() for r in caplog.records if "without TRITON_INTERPRET=1" in r.getMessage()]
    assert len(messages) == 1 and "the PyTorch reference runs instead" in messages[0]  # once per reason


def test_fp16_inputs() -> None:
    """fp16 features: fp16 operands (rounded to nearest) and gradients, fp32 loss."""
    torch.manual_seed(8)
    low, ref = _leaves(torch.float16, 21, 24, 14.3, -10.0)
    _check(clip_loss_triton(low[0], low[1], low[0], low[1], low[2], 0, SMALL), low[:3], direct_clip(*ref[:3]),
           ref[:3], 1e-2)
    _check(siglip_loss_triton(low[0], low[1], low[2], low[3], 0, SMALL), low, direct_siglip(*ref), ref, 1e-2)

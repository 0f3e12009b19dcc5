"""Fused DINO Triton kernels (Triton's CPU interpreter) against the fp64 loop formula and the torch module.

Relative error below 1e-5 for fp32 logits and 1e-2 for bf16 (reference: fp64 on the same bf16 values), for
the loss, the student gradient and the teacher column sum of the centre update.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from kernels.dino_reference import dino_loss
from kernels.dino_triton import dino_loss_and_center_sum, dino_loss_triton
from kernels import triton_runtime
from kernels.triton_runtime import LAUNCHES, DinoBlocks, backend_for
from test_losses import _rel_err, direct_dino
from train.losses.dino_loss import DINOLoss

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (B, K, n_global, n_crops, tiles): odd sizes, K tails over several slices, image-block tails, one global crop
CASES = [(7, 33, 2, 6, DinoBlocks(k=16, images=3)), (3, 5, 2, 2, DinoBlocks(k=16, images=2)),
         (4, 16, 1, 3, DinoBlocks()), (9, 300, 2, 5, DinoBlocks(k=64, images=4))]


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _logits(rows: int, k: int, dtype: torch.dtype) -> Tensor:
    return (3 * torch.randn(rows, k, dtype=torch.float64)).to(dtype)  # (rows, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k,n_global,n_crops,blocks", CASES)
def test_dino_fused_matches_fp64(dtype: torch.dtype, batch: int, k: int, n_global: int, n_crops: int,
                                 blocks: DinoBlocks) -> None:
    torch.manual_seed(batch * 1000 + k)
    student, teacher = _logits(n_crops * batch, k, dtype), _logits(n_global * batch, k, dtype)
    center = torch.randn(1, k)
    leaf = student.clone().requires_grad_()
    before = dict(LAUNCHES)
    loss, batch_sum = dino_loss_and_center_sum(leaf, teacher, center, 0.1, 0.04, n_global, blocks)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert LAUNCHES["dino_forward"] == before.get("dino_forward", 0) + 1
    assert LAUNCHES["dino_backward"] == before.get("dino_backward", 0) + 1
    ref = student.double().requires_grad_()
    want = direct_dino(ref, teacher.double(), center.double(), 0.1, 0.04, n_global)
    (want_grad,) = torch.autograd.grad(want, ref)
    assert loss.dtype == torch.float32 and _rel_err(loss, want) < TOL[dtype]
    assert grad.dtype == dtype and _rel_err(grad, want_grad) < TOL[dtype]
    assert batch_sum.shape == (1, k) and _rel_err(batch_sum, teacher.double().sum(0, keepdim=True)) < 1e-6


def test_dino_fused_same_signature_and_teacher_gets_no_grad() -> None:
    torch.manual_seed(0)
    student = torch.randn(12, 40, requires_grad=True)
    teacher = torch.randn(6, 40, requires_grad=True)
    center = torch.zeros(1, 40)
    loss = dino_loss_triton(student, teacher, center, 0.1, 0.04, 2, DinoBlocks(k=16, images=2))
    assert _rel_err(loss, dino_loss(student.double(), teacher.double(), center.double(), 0.1, 0.04, 2)) < 1e-5
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError):
        dino_loss_triton(torch.randn(10, 6), torch.randn(6, 6), torch.zeros(1, 6), 0.1, 0.04, 2)  # 10 % 3 != 0
    with pytest.raises(ValueError):
        dino_loss_triton(torch.randn(3, 6), torch.randn(3, 6), torch.zeros(1, 6), 0.1, 0.04, 1)  # one crop only
    with pytest.raises(ValueError, match="centre 20"):  # the kernels would read the centre past its end
        dino_loss_triton(torch.randn(8, 40), torch.randn(4, 40), torch.zeros(1, 20), 0.1, 0.04, 2)
    with pytest.raises(ValueError, match="teacher 30"):
        dino_loss_triton(torch.randn(8, 40), torch.randn(4, 30), torch.zeros(1, 40), 0.1, 0.04, 2)
    student = torch.randn(12, 40, requires_grad=True)
    loss = dino_loss_triton(student, teacher.detach(), center, 0.1, 0.04, 2, DinoBlocks(k=16, images=2))
    with pytest.raises(RuntimeError, match="double backward"):  # no graph through the kernel's gradient
        torch.autograd.grad(loss, student, create_graph=True)


def test_dino_module_triton_tracks_the_torch_module() -> None:
    """Two steps: same losses, gradients (taken after the in-place centre update) and centres as impl=torch."""
    torch.manual_seed(6)
    batch, k, n_crops = 5, 48, 4
    fused = DINOLoss(k, n_global_crops=2, student_temp=0.1, center_momentum=0.9, impl="triton")
    ref = DINOLoss(k, n_global_crops=2, student_temp=0.1, center_momentum=0.9).double()
    assert fused.native_dtype and not ref.native_dtype and "impl='triton'" in repr(fused)
    for step in range(2):
        student, teacher = _logits(n_crops * batch, k, torch.float32), _logits(2 * batch, k, torch.float32)
        a, b = student.clone().requires_grad_(), student.double().requires_grad_()
        got, want = fused(a, teacher, 0.04 + 0.01 * step), ref(b, teacher.double(), 0.04 + 0.01 * step)
        got.backward()  # after forward() moved the centre: the saved copy must be used
        want.backward()
        assert _rel_err(got, want) < 1e-5 and _rel_err(a.grad, b.grad) < 1e-5
        assert _rel_err(fused.center, ref.center) < 1e-6
    restored = DINOLoss(k, impl="triton")
    restored.load_state_dict(fused.state_dict())
    assert torch.equal(restored.center, fused.center)


def test_dino_cpu_fallback_is_the_reference(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Without TRITON_INTERPRET (or with fp64 logits) the module runs the reference: bitwise the torch module."""
    torch.manual_seed(7)
    student, teacher = torch.randn(12, 20), torch.randn(6, 20)
    assert backend_for("dino_kernels", student, teacher) == "interpreter"
    assert backend_for("dino_kernels", student.double(), teacher.double()) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(triton_runtime, "_warned", set())  # forget earlier warnings: count this test's
    launches = sum(LAUNCHES.values())
    fused, ref = DINOLoss(20, impl="triton"), DINOLoss(20)
    with caplog.at_level(logging.WARNING, logger="clipdino.kernels"):
        for _ in range(2):
            assert torch.equal(fused(student, teacher, 0.04), ref(student, teacher, 0.04))
            assert torch.equal(fused.center, ref.center)
    assert sum(LAUNCHES.values()) == launches
    assert len([r for r in caplog.records if "without TRITON_INTERPRET=1" in r.getMessage()]) == 1

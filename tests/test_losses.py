"""Single-process checks of the loss kernels and modules against direct formulas written here."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kernels.contrastive_reference import clip_loss, siglip_loss
from kernels.dino_reference import dino_loss, teacher_batch_center, update_center
from train.losses.clip_loss import ClipLoss
from train.losses.dino_loss import DINOLoss
from train.losses.siglip_loss import SigLipLoss

CONTRASTIVE_SIZES = [(1, 4), (7, 13), (16, 32), (5, 3)]  # (N, D)
SCALES = [1.0, 14.3, 100.0]


def _unit_rows(n: int, d: int, dtype: torch.dtype = torch.float64) -> Tensor:
    x = torch.randn(n, d, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)  # (n, d)


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- direct fp64 formulas (independent)
def direct_clip(img: Tensor, txt: Tensor, scale: Tensor) -> Tensor:
    """Full N x N InfoNCE with a hand-written log-sum-exp."""
    logits = scale * img @ txt.T  # (N, N)

    def mean_row_ce(l: Tensor) -> Tensor:
        peak = l.max(dim=1, keepdim=True).values.detach()  # (N, 1)
        log_norm = peak.squeeze(1) + torch.log(torch.exp(l - peak).sum(dim=1))  # (N,)
        return (log_norm - l.diagonal()).mean()

    return (mean_row_ce(logits) + mean_row_ce(logits.T)) / 2


def direct_siglip(img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Sum of log(1 + exp(-y z)) over the full N x N matrix, divided by N."""
    n = img.shape[0]
    z = scale * img @ txt.T + bias  # (N, N)
    y = 2 * torch.eye(n, dtype=z.dtype) - 1  # (N, N)
    return torch.log1p(torch.exp(-y * z)).sum() / n


def direct_dino(
    student: Tensor, teacher: Tensor, center: Tensor, s_temp: float, t_temp: float, n_global: int
) -> Tensor:
    """Loop over crop pairs and batch rows, with explicit softmaxes."""
    batch = teacher.shape[0] // n_global
    n_crops = student.shape[0] // batch
    total, terms = 0.0, 0
    for iq in range(n_global):
        for v in range(n_crops):
            if v == iq:
                continue
            pair = 0.0
            for b in range(batch):
                t = (teacher[iq * batch + b] - center[0]) / t_temp  # (K,)
                q = torch.exp(t - t.max()) / torch.exp(t - t.max()).sum()  # (K,)
                s = student[v * batch + b] / s_temp  # (K,)
                log_p = s - s.max() - torch.log(torch.exp(s - s.max()).sum())  # (K,)
                pair = pair + (-q.detach() * log_p).sum()
            total = total + pair / batch
            terms += 1
    return total / terms


# ---------------------------------------------------------------- CLIP
@pytest.mark.parametrize("n,d", CONTRASTIVE_SIZES)
@pytest.mark.parametrize("scale_value", SCALES)
def test_clip_loss_matches_direct_fp64(n: int, d: int, scale_value: float) -> None:
    torch.manual_seed(n * 100 + d)
    img, txt = _unit_rows(n, d).requires_grad_(), _unit_rows(n, d).requires_grad_()
    scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    got = clip_loss(img, txt, img, txt, scale, 0)
    want = direct_clip(img, txt, scale)
    assert _rel_err(got, want) < 1e-10
    got_grads = torch.autograd.grad(got, (img, txt, scale))
    want_grads = torch.autograd.grad(want, (img, txt, scale))
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d", CONTRASTIVE_SIZES)
def test_clip_loss_fp32_close_to_fp64(n: int, d: int) -> None:
    torch.manual_seed(n + d)
    img32, txt32 = _unit_rows(n, d, torch.float32), _unit_rows(n, d, torch.float32)
    for scale_value in SCALES:
        scale32 = torch.tensor(scale_value, requires_grad=True)
        args32 = [img32.clone().requires_grad_(), txt32.clone().requires_grad_(), scale32]
        args64 = [a.detach().double().requires_grad_() for a in args32]
        got = clip_loss(args32[0], args32[1], args32[0], args32[1], args32[2], 0)
        want = direct_clip(*args64)
        assert got.dtype == torch.float32 and _rel_err(got, want) < 1e-5
        for g, w in zip(torch.autograd.grad(got, args32), torch.autograd.grad(want, args64)):
            assert _rel_err(g, w) < 1e-4


@pytest.mark.parametrize("world", [2, 3])
def test_clip_loss_local_slices_average_to_global(world: int) -> None:
    """Rank-local form in one process: mean over slices == global loss; slice grads sum to the global grad."""
    torch.manual_seed(world)
    batch, d = 7, 13
    img, txt = _unit_rows(world * batch, d).requires_grad_(), _unit_rows(world * batch, d).requires_grad_()
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    slices = [slice(r * batch, (r + 1) * batch) for r in range(world)]
    local = torch.stack([clip_loss(img[s], txt[s], img, txt, scale, s.start) for s in slices]).mean()
    full = direct_clip(img, txt, scale)
    assert _rel_err(local, full) < 1e-10
    for g, w in zip(torch.autograd.grad(local, (img, txt, scale)), torch.autograd.grad(full, (img, txt, scale))):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_clip_loss_rejects_bad_offset() -> None:
    img = _unit_rows(4, 3)
    with pytest.raises(ValueError, match="outside"):
        clip_loss(img, img, img, img, torch.tensor(1.0, dtype=torch.float64), 1)


# ---------------------------------------------------------------- SigLIP
@pytest.mark.parametrize("n,d", CONTRASTIVE_SIZES)
@pytest.mark.parametrize("scale_value,bias_value", [(10.0, -10.0), (1.0, 0.0), (37.5, -3.2)])
def test_siglip_loss_matches_direct_fp64(n: int, d: int, scale_value: float, bias_value: float) -> None:
    torch.manual_seed(n * 7 + d)
    img, txt = _unit_rows(n, d).requires_grad_(), _unit_rows(n, d).requires_grad_()
    scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(bias_value, dtype=torch.float64, requires_grad=True)
    got = siglip_loss(img, txt, scale, bias, 0)
    want = direct_siglip(img, txt, scale, bias)
    assert _rel_err(got, want) < 1e-10
    leaves = (img, txt, scale, bias)
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d", CONTRASTIVE_SIZES)
def test_siglip_loss_fp32_close_to_fp64(n: int, d: int) -> None:
    torch.manual_seed(3 * n + d)
    img32, txt32 = _unit_rows(n, d, torch.float32), _unit_rows(n, d, torch.float32)
    scale32, bias32 = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    args32 = [img32.requires_grad_(), txt32.requires_grad_(), scale32, bias32]
    args64 = [a.detach().double().requires_grad_() for a in args32]
    got = siglip_loss(args32[0], args32[1], args32[2], args32[3], 0)
    want = direct_siglip(*args64)
    assert got.dtype == torch.float32 and _rel_err(got, want) < 1e-5
    for g, w in zip(torch.autograd.grad(got, args32), torch.autograd.grad(want, args64)):
        assert _rel_err(g, w) < 1e-4


def test_siglip_loss_local_slices_average_to_global() -> None:
    torch.manual_seed(11)
    world, batch, d = 3, 5, 9
    img, txt = _unit_rows(world * batch, d).requires_grad_(), _unit_rows(world * batch, d).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    slices = [slice(r * batch, (r + 1) * batch) for r in range(world)]
    local = torch.stack([siglip_loss(img[s], txt, scale, bias, s.start) for s in slices]).mean()
    full = direct_siglip(img, txt, scale, bias)
    assert _rel_err(local, full) < 1e-10
    leaves = (img, txt, scale, bias)
    for g, w in zip(torch.autograd.grad(local, leaves), torch.autograd.grad(full, leaves)):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- DINO
DINO_SIZES = [(7, 33, 2, 6), (3, 5, 2, 2), (4, 16, 1, 3), (2, 8, 2, 3)]  # (B, K, n_global, n_crops)


@pytest.mark.parametrize("batch,k,n_global,n_crops", DINO_SIZES)
def test_dino_loss_matches_direct_loop(batch: int, k: int, n_global: int, n_crops: int) -> None:
    torch.manual_seed(batch * 1000 + k)
    student = (3 * torch.randn(n_crops * batch, k, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(n_global * batch, k, dtype=torch.float64)
    center = torch.randn(1, k, dtype=torch.float64)
    got = dino_loss(student, teacher, center, 0.1, 0.04, n_global)
    want = direct_dino(student, teacher, center, 0.1, 0.04, n_global)
    assert _rel_err(got, want) < 1e-10
    (g,), (w,) = torch.autograd.grad(got, student), torch.autograd.grad(want, student)
    assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    got32 = dino_loss(student.detach().float(), teacher.float(), center.float(), 0.1, 0.04, n_global)
    assert _rel_err(got32, want) < 1e-5


def test_dino_loss_teacher_gets_no_grad_and_rejects_bad_shapes() -> None:
    torch.manual_seed(0)
    student = torch.randn(12, 6, requires_grad=True)
    teacher = torch.randn(6, 6, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 6), 0.1, 0.04, 2).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError):
        dino_loss(torch.randn(10, 6), torch.randn(6, 6), torch.zeros(1, 6), 0.1, 0.04, 2)  # 10 % 3 != 0
    with pytest.raises(ValueError):
        dino_loss(torch.randn(3, 6), torch.randn(3, 6), torch.zeros(1, 6), 0.1, 0.04, 1)  # one crop only


def test_center_update_math() -> None:
    torch.manual_seed(1)
    teacher = torch.randn(10, 33, dtype=torch.float64)
    center = torch.randn(1, 33, dtype=torch.float64)
    batch_sum = teacher_batch_center(teacher)
    assert batch_sum.shape == (1, 33)
    assert torch.allclose(batch_sum[0], sum(teacher[i] for i in range(10)), rtol=1e-12)
    new = update_center(center, batch_sum / 10, 0.9)
    assert torch.allclose(new, 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- modules (one process)
def test_clip_and_siglip_modules_equal_kernels() -> None:
    torch.manual_seed(5)
    img, txt = _unit_rows(7, 13), _unit_rows(7, 13)
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    assert torch.equal(ClipLoss()(img, txt, scale), clip_loss(img, txt, img, txt, scale, 0))
    assert torch.equal(SigLipLoss()(img, txt, scale, bias), siglip_loss(img, txt, scale, bias, 0))


def test_dino_module_equals_kernel_and_updates_center() -> None:
    torch.manual_seed(6)
    batch, k, n_crops = 7, 33, 4
    module = DINOLoss(k, n_global_crops=2, student_temp=0.1, center_momentum=0.9).double()
    assert "center" in module.state_dict() and torch.equal(module.center, torch.zeros(1, k, dtype=torch.float64))
    center = torch.zeros(1, k, dtype=torch.float64)
    for step in range(2):
        student = torch.randn(n_crops * batch, k, dtype=torch.float64)
        teacher = torch.randn(2 * batch, k, dtype=torch.float64)
        got = module(student, teacher, teacher_temp=0.04 + 0.01 * step)
        assert torch.equal(got, dino_loss(student, teacher, center, 0.1, 0.04 + 0.01 * step, 2))
        center = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)
        assert torch.allclose(module.center, center, rtol=1e-12, atol=1e-15)
    restored = DINOLoss(k).double()
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored.center, module.center)


@pytest.mark.parametrize(
    "make", [lambda: ClipLoss(impl="cuda"), lambda: SigLipLoss(impl="fused"), lambda: DINOLoss(8, impl="x")]
)
def test_unknown_impl_raises(make) -> None:
    with pytest.raises(ValueError, match="torch"):
        make()


def test_dino_centre_updates_once_per_optimizer_step_when_deferred():
    """Two micro-batches of one step move the centre like one batch of both (facebookresearch/dino's order)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 12, 32), torch.randn(2, 6, 32)  # (micro-batch, rows, K)
    deferred = DINOLoss(32, n_global_crops=2, center_momentum=0.9, deferred_center=True)
    losses = [deferred(s, t, 0.04) for s, t in zip(student, teacher)]
    assert torch.equal(deferred.center, torch.zeros(1, 32))  # nothing moves before the step ends
    deferred.commit_center()
    expected = 0.1 * teacher.reshape(-1, 32).mean(0, keepdim=True)
    assert torch.allclose(deferred.center, expected, atol=1e-6)
    first = DINOLoss(32, n_global_crops=2)  # both micro-batches were scored against the same (step-start) centre
    assert torch.allclose(losses[1], first(student[1], teacher[1], 0.04))
    deferred(student[0], teacher[0], 0.04)
    deferred.discard_center()  # a skipped step
    deferred.commit_center()
    assert torch.allclose(deferred.center, expected, atol=1e-6)

"""Triton kernels of the fused DINO loss (see kernels/dino_triton.py for the math and the autograd Function).

Layout: student (V*B, K) and teacher (G*B, K) are crop-major, so image b's crop v is row v*B + b.

    forward   grid (K / BLOCK_K, B / IMAGES): ONE read of student and teacher. For each (K slice, image):
              per-row max and sum of exp of the student s/t_s and the centred teacher (t - c)/t_t, and the
              cross sums W[g, v] = sum_k exp(teacher_g - max_g) * s_v / t_s, all over the slice only
              (partials, merged over slices on the host: O(V*B*K/BLOCK_K) floats); plus the teacher column
              sums of the slice for the centre update (a (B / IMAGES, K) partial, no atomics).
    backward  grid (K / BLOCK_K, B): ONE read of student and teacher, one write of the student gradient:
              d s_v = coef * (c_v softmax(s_v / t_s) - sum_{g != v} q_g), c_v = #{g != v}.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_common import INTERPRETED, for_store
from kernels.triton_runtime import LAUNCHES, DinoBlocks, dtype_kind, launch_options


@triton.jit
def _dino_forward_kernel(s_ptr, t_ptr, c_ptr, s_max_ptr, s_sum_ptr, t_max_ptr, t_sum_ptr, w_ptr, colsum_ptr,
                         B, K, student_temp, teacher_temp,
                         V: tl.constexpr, G: tl.constexpr, VPAD: tl.constexpr, BLOCK_K: tl.constexpr,
                         IMAGES: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    vs = tl.arange(0, VPAD)
    v_ok = vs < V
    center = tl.load(c_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
    colsum = tl.zeros((BLOCK_K,), tl.float32)
    s_part = pid_k.to(tl.int64) * V * B  # this slice's partials: s_max / s_sum [slice, v*B + b]
    t_part = pid_k.to(tl.int64) * G * B
    for i in range(IMAGES):
        b = pid_b * IMAGES + i
        b_ok = b < B
        srow = vs.to(tl.int64) * B + b  # (VPAD,) student rows of image b
        row_ok = v_ok & b_ok
        s = tl.load(s_ptr + srow[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        s = s.to(tl.float32) / student_temp  # (VPAD, BK)
        s_in = tl.where(k_ok[None, :], s, float("-inf"))
        s_max = tl.max(s_in, axis=1)  # (VPAD,)
        tl.store(s_max_ptr + s_part + srow, s_max, mask=row_ok)
        tl.store(s_sum_ptr + s_part + srow, tl.sum(tl.exp(s_in - s_max[:, None]), axis=1), mask=row_ok)
        for g in tl.static_range(G):
            trow = g * B + b
            t = tl.load(t_ptr + trow.to(tl.int64) * K + ks, mask=k_ok & b_ok, other=0.0).to(tl.float32)  # (BK,)
            colsum += t
            tt = tl.where(k_ok, (t - center) / teacher_temp, float("-inf"))
            t_max = tl.max(tt, axis=0)
            e = tl.exp(tt - t_max)  # (BK,)
            tl.store(t_max_ptr + t_part + trow, t_max, mask=b_ok)
            tl.store(t_sum_ptr + t_part + trow, tl.sum(e, axis=0), mask=b_ok)
            cross = tl.sum(e[None, :] * s, axis=1)  # (VPAD,) sum_k e_g * s_v over the slice
            tl.store(w_ptr + (pid_k.to(tl.int64) * G + g) * V * B + srow, cross, mask=row_ok)
    tl.store(colsum_ptr + pid_b.to(tl.int64) * K + ks, colsum, mask=k_ok)


@triton.jit
def _dino_backward_kernel(s_ptr, t_ptr, c_ptr, lse_ptr, t_max_ptr, t_sum_ptr, coef_ptr, ds_ptr,
                          B, K, student_temp, teacher_temp,
                          V: tl.constexpr, G: tl.constexpr, VPAD: tl.constexpr, BLOCK_K: tl.constexpr,
                          KIND_OUT: tl.constexpr, INTERP: tl.constexpr):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    b = tl.program_id(1)
    vs = tl.arange(0, VPAD)
    v_ok = vs < V
    srow = vs.to(tl.int64) * B + b  # (VPAD,)
    mask = v_ok[:, None] & k_ok[None, :]
    s = tl.load(s_ptr + srow[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32) / student_temp
    lse = tl.load(lse_ptr + srow, mask=v_ok, other=0.0)  # (VPAD,)
    p = tl.exp(s - lse[:, None])  # (VPAD, BK) student softmax
    center = tl.load(c_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
    q_all = tl.zeros((BLOCK_K,), tl.float32)
    q_own = tl.zeros((VPAD, BLOCK_K), tl.float32)  # row v < G: the teacher of the same crop (excluded pair)
    for g in tl.static_range(G):
        trow = g * B + b
        t = tl.load(t_ptr + trow.to(tl.int64) * K + ks, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.exp((t - center) / teacher_temp - tl.load(t_max_ptr + trow)) / tl.load(t_sum_ptr + trow)
        q = tl.where(k_ok, q, 0.0)  # (BK,) teacher softmax
        q_all += q
        q_own += tl.where(vs[:, None] == g, q[None, :], 0.0)
    n_teachers = G - tl.where(vs < G, 1.0, 0.0)  # (VPAD,) teachers paired with crop v
    coef = tl.load(coef_ptr).to(tl.float32)
    grad = coef * (n_teachers[:, None] * p - (q_all[None, :] - q_own))  # (VPAD, BK)
    tl.store(ds_ptr + srow[:, None] * K + ks[None, :], for_store(grad, KIND_OUT, INTERP), mask=mask)


def _vpad(n_crops: int) -> int:
    return max(2, triton.next_power_of_2(n_crops))


def dino_forward(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float, teacher_temp: float,
                 n_global: int, batch: int, blocks: DinoBlocks) -> dict[str, Tensor]:
    """Slice partials of one forward pass (fp32): s_max, s_sum (S, V*B); t_max, t_sum (S, G*B);
    w (S, G, V*B); colsum (B / images, K). student, teacher: contiguous; center: (K,) contiguous."""
    rows, K = student.shape
    n_crops = rows // batch
    slices, image_blocks = triton.cdiv(K, blocks.k), triton.cdiv(batch, blocks.images)
    f32 = dict(dtype=torch.float32, device=student.device)
    out = {"s_max": torch.empty(slices, rows, **f32), "s_sum": torch.empty(slices, rows, **f32),  # (S, V*B)
           "t_max": torch.empty(slices, n_global * batch, **f32),  # (S, G*B)
           "t_sum": torch.empty(slices, n_global * batch, **f32),  # (S, G*B)
           "w": torch.empty(slices, n_global, rows, **f32),  # (S, G, V*B)
           "colsum": torch.empty(image_blocks, K, **f32)}  # (B / images, K)
    _dino_forward_kernel[(slices, image_blocks)](
        student, teacher, center, out["s_max"], out["s_sum"], out["t_max"], out["t_sum"], out["w"], out["colsum"],
        batch, K, float(student_temp), float(teacher_temp), V=n_crops, G=n_global, VPAD=_vpad(n_crops),
        BLOCK_K=blocks.k, IMAGES=blocks.images, **launch_options(_backend(), blocks.num_warps, blocks.num_stages))
    LAUNCHES["dino_forward"] += 1
    return out


def dino_backward(student: Tensor, teacher: Tensor, center: Tensor, lse: Tensor, t_max: Tensor, t_sum: Tensor,
                  coef: Tensor, student_temp: float, teacher_temp: float, n_global: int, batch: int,
                  blocks: DinoBlocks) -> Tensor:
    """The student gradient (V*B, K) in the student's dtype. lse (V*B,), t_max / t_sum (G*B,): merged
    statistics of the forward; coef: 1-element fp32 tensor, d loss / d (pair cross-entropy sum) / student_temp."""
    rows, K = student.shape
    n_crops = rows // batch
    grad = torch.empty_like(student)  # (V*B, K)
    _dino_backward_kernel[(triton.cdiv(K, blocks.k), batch)](
        student, teacher, center, lse, t_max, t_sum, coef, grad, batch, K, float(student_temp), float(teacher_temp),
        V=n_crops, G=n_global, VPAD=_vpad(n_crops), BLOCK_K=blocks.k, KIND_OUT=dtype_kind(grad.dtype),
        INTERP=INTERPRETED, **launch_options(_backend(), blocks.num_warps, blocks.num_stages))
    LAUNCHES["dino_backward"] += 1
    return grad


def _backend() -> str:
    return "interpreter" if INTERPRETED else "compiled"

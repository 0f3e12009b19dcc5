"""Tiled pairwise-logit Triton kernels shared by the CLIP (softmax) and SigLIP (sigmoid) losses.

A (M, D) holds this rank's rows, C (N, D) the gathered rows; row i's positive is column ``offset + i``.
Logits z_ij = scale * <A_i, C_j> (+ bias for SIGMOID) exist only one (BLOCK_M, BLOCK_N) tile at a time,
in registers; the dot product runs over D in BLOCK_K slices. Nothing of size M x N is ever stored.

    forward        grid (M/BM,)         SOFTMAX: online log-sum-exp per row -> lse (M,), positive <A_i, C_pos> (M,)
                                        SIGMOID: per-row sum of softplus(-y z) -> row loss (M,)
    backward rows  grid (M/BM, D/BD)    dA = coef * W @ C, and per row sum_j W*S, sum_j W (scale / bias grads)
    backward cols  grid (N/BN, D/BD)    dC = coef * W^T @ A
with S = <A_i, C_j> recomputed tile by tile and W = d(pair term)/dz: SOFTMAX softmax_j(z) - onehot(offset + i),
SIGMOID -y sigmoid(-y z) with y = +1 on the positive pair, -1 elsewhere. Gradients accumulate in registers
over a BLOCK_D_OUT slice of D; when D > BLOCK_D_OUT the logits are recomputed once per slice.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_common import INTERPRETED, for_store, mm, operand, sigmoid, softplus
from kernels.triton_runtime import LAUNCHES, PairwiseBlocks as Blocks, dtype_kind, launch_options

SOFTMAX, SIGMOID = 0, 1


@triton.jit
def _tile_dot(a_ptr, c_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_c, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KIND: tl.constexpr, INTERP: tl.constexpr):
    """S = <A_rows, C_cols>, (BLOCK_M, BLOCK_N) fp32; masked rows / columns give 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        ct = tl.load(c_ptr + cols[None, :] * stride_c + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += mm(a, ct, KIND, INTERP)  # (BM, BK) @ (BK, BN)
    return acc


@triton.jit
def _pair_weights(s, scale, bias, lse, diag, valid, MODE: tl.constexpr):
    """W = d(pair term)/dz for a tile, 0 outside the valid (row, column) pairs."""
    if MODE == 0:
        w = tl.exp(s * scale - lse[:, None]) - tl.where(diag, 1.0, 0.0)
    else:
        z = s * scale + bias
        x = tl.where(diag, -z, z)  # -y z
        sg = sigmoid(x)
        w = tl.where(diag, -sg, sg)  # -y sigmoid(-y z)
    return tl.where(valid, w, 0.0)


@triton.jit
def _row_lse(lse_ptr, rows, row_ok, BLOCK_M: tl.constexpr, MODE: tl.constexpr):
    """The rows' log-sum-exp (SOFTMAX); SIGMOID has none (zeros, unused)."""
    if MODE == 0:
        return tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    else:
        return tl.zeros((BLOCK_M,), tl.float32)


@triton.jit
def _forward_kernel(a_ptr, c_ptr, scale_ptr, bias_ptr, out0_ptr, out1_ptr, M, N, D, offset, stride_a, stride_c,
                    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    KIND: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)  # SOFTMAX: positive dot; SIGMOID: row loss
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _tile_dot(a_ptr, c_ptr, rows64, cols.to(tl.int64), row_ok, col_ok, D, stride_a, stride_c,
                      BLOCK_M, BLOCK_N, BLOCK_K, KIND, INTERP)  # (BM, BN)
        diag = cols[None, :] == rows[:, None] + offset
        if MODE == 0:
            z = tl.where(col_ok[None, :], s * scale, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
            acc += tl.sum(tl.where(diag, s, 0.0), axis=1)
        else:
            z = s * scale + bias
            acc += tl.sum(tl.where(col_ok[None, :], softplus(tl.where(diag, -z, z)), 0.0), axis=1)
    if MODE == 0:
        tl.store(out0_ptr + rows, run_max + tl.log(run_sum), mask=row_ok)
        tl.store(out1_ptr + rows, acc, mask=row_ok)
    else:
        tl.store(out0_ptr + rows, acc, mask=row_ok)


@triton.jit
def _backward_rows_kernel(a_ptr, c_ptr, scale_ptr, bias_ptr, lse_ptr, coef_ptr, da_ptr, ws_ptr, w_ptr,
                          M, N, D, offset, stride_a, stride_c, stride_da,
                          MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_DO: tl.constexpr, KIND: tl.constexpr, KIND_OUT: tl.constexpr,
                          INTERP: tl.constexpr):
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcols < D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    lse = _row_lse(lse_ptr, rows, row_ok, BLOCK_M, MODE)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    ws = tl.zeros((BLOCK_M,), tl.float32)
    wsum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
        s = _tile_dot(a_ptr, c_ptr, rows64, cols64, row_ok, col_ok, D, stride_a, stride_c,
                      BLOCK_M, BLOCK_N, BLOCK_K, KIND, INTERP)  # (BM, BN)
        diag = cols[None, :] == rows[:, None] + offset
        w = _pair_weights(s, scale, bias, lse, diag, row_ok[:, None] & col_ok[None, :], MODE)  # (BM, BN)
        ws += tl.sum(w * s, axis=1)
        wsum += tl.sum(w, axis=1)
        c = tl.load(c_ptr + cols64[:, None] * stride_c + dcols[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BN, BDO)
        acc += mm(operand(w, KIND, INTERP), c, KIND, INTERP)
    da = for_store(acc * coef, KIND_OUT, INTERP)
    tl.store(da_ptr + rows64[:, None] * stride_da + dcols[None, :], da, mask=row_ok[:, None] & d_ok[None, :])
    first = row_ok & (pid_d == 0)
    tl.store(ws_ptr + rows, ws, mask=first)
    tl.store(w_ptr + rows, wsum, mask=first)


@triton.jit
def _backward_cols_kernel(a_ptr, c_ptr, scale_ptr, bias_ptr, lse_ptr, coef_ptr, dc_ptr,
                          M, N, D, offset, stride_a, stride_c, stride_dc,
                          MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_DO: tl.constexpr, KIND: tl.constexpr, KIND_OUT: tl.constexpr,
                          INTERP: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dcols < D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    coef = tl.load(coef_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        s = _tile_dot(a_ptr, c_ptr, rows64, cols64, row_ok, col_ok, D, stride_a, stride_c,
                      BLOCK_M, BLOCK_N, BLOCK_K, KIND, INTERP)  # (BM, BN)
        lse = _row_lse(lse_ptr, rows, row_ok, BLOCK_M, MODE)
        diag = cols[None, :] == rows[:, None] + offset
        w = _pair_weights(s, scale, bias, lse, diag, row_ok[:, None] & col_ok[None, :], MODE)  # (BM, BN)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BM, BDO)
        acc += mm(tl.trans(operand(w, KIND, INTERP)), a, KIND, INTERP)  # (BN, BM) @ (BM, BDO)
    dc = for_store(acc * coef, KIND_OUT, INTERP)
    tl.store(dc_ptr + cols64[:, None] * stride_dc + dcols[None, :], dc, mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def _backend() -> str:
    return "interpreter" if INTERPRETED else "compiled"


def pairwise_forward(a: Tensor, c: Tensor, scale: Tensor, bias: Optional[Tensor], offset: int, mode: int,
                     blocks: Blocks) -> tuple[Tensor, Tensor]:
    """SOFTMAX: (lse (M,), positive dot (M,)); SIGMOID: (row loss (M,), same tensor). All fp32.

    a: (M, D), c: (N, D), same dtype, contiguous; scale, bias: 1-element fp32 tensors on the same device.
    """
    M, D = a.shape
    N = c.shape[0]
    out0 = torch.empty(M, dtype=torch.float32, device=a.device)  # (M,)
    out1 = torch.empty(M, dtype=torch.float32, device=a.device) if mode == SOFTMAX else out0  # (M,)
    bias = scale if bias is None else bias
    grid = (triton.cdiv(M, blocks.m),)
    _forward_kernel[grid](a, c, scale, bias, out0, out1, M, N, D, offset, a.stride(0), c.stride(0),
                          MODE=mode, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, KIND=dtype_kind(a.dtype),
                          INTERP=INTERPRETED,
                          **launch_options(_backend(), blocks.num_warps, blocks.num_stages))
    LAUNCHES["pairwise_forward"] += 1
    return out0, out1


def pairwise_backward(a: Tensor, c: Tensor, scale: Tensor, bias: Optional[Tensor], lse: Optional[Tensor],
                      offset: int, mode: int, coef: Tensor, need_c: bool,
                      blocks: Blocks) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(dA (M, D), dC (N, D) or None, sum_j W*S per row (M,), sum_j W per row (M,)).

    coef: 1-element fp32 tensor multiplying the feature gradients (d loss / d pair-term sum x scale).
    lse: the forward's row log-sum-exp (SOFTMAX only).
    """
    M, D = a.shape
    N = c.shape[0]
    bias = scale if bias is None else bias
    lse = scale if lse is None else lse  # SIGMOID never reads it
    options = launch_options(_backend(), blocks.num_warps, blocks.num_stages)
    block_do = blocks.d_out_for(a.dtype, D)
    da = torch.empty_like(a)  # (M, D)
    ws = torch.empty(M, dtype=torch.float32, device=a.device)  # (M,)
    wsum = torch.empty(M, dtype=torch.float32, device=a.device)  # (M,)
    grid = (triton.cdiv(M, blocks.m), triton.cdiv(D, block_do))
    _backward_rows_kernel[grid](a, c, scale, bias, lse, coef, da, ws, wsum, M, N, D, offset,
                                a.stride(0), c.stride(0), da.stride(0), MODE=mode, BLOCK_M=blocks.m,
                                BLOCK_N=blocks.n, BLOCK_K=blocks.k, BLOCK_DO=block_do, KIND=dtype_kind(c.dtype),
                                KIND_OUT=dtype_kind(da.dtype), INTERP=INTERPRETED, **options)
    LAUNCHES["pairwise_backward_rows"] += 1
    dc = None
    if need_c:
        dc = torch.empty_like(c)  # (N, D)
        grid = (triton.cdiv(N, blocks.n), triton.cdiv(D, block_do))
        _backward_cols_kernel[grid](a, c, scale, bias, lse, coef, dc, M, N, D, offset,
                                    a.stride(0), c.stride(0), dc.stride(0), MODE=mode, BLOCK_M=blocks.m,
                                    BLOCK_N=blocks.n, BLOCK_K=blocks.k, BLOCK_DO=block_do,
                                    KIND=dtype_kind(a.dtype), KIND_OUT=dtype_kind(dc.dtype), INTERP=INTERPRETED,
                                    **options)
        LAUNCHES["pairwise_backward_cols"] += 1
    return da, dc, ws, wsum

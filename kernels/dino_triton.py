"""Fused DINO loss: one pass forward (loss + centre batch sum), one pass backward, no B x K fp32 buffer.

Same value as ``kernels.dino_reference.dino_loss`` (the reference beside it). With q_g = softmax((t_g - c)/t_t)
(teacher crop g) and log p_v = s_v / t_s - lse_v (student crop v), for each image

    sum_{g, v != g} CE(q_g, p_v) = sum_{g, v != g} (lse_v - <q_g, s_v> / t_s),

so the loss needs only per-row statistics (student lse, teacher max and normaliser) and the G x V cross sums
<exp(t_g - max_g), s_v>, which the forward kernel accumulates per K slice in a single read of the logits
(partials merged here over slices: O(rows x K / BLOCK_K) floats). The same pass sums the teacher columns
for the centre update. Backward reads the logits once more and writes the student gradient
d s_v = (c_v p_v - sum_{g != v} q_g) / (n_pairs B t_s), c_v = number of teachers paired with crop v.

Saved for backward: the student and teacher logits as given (bf16 stays bf16), a copy of the (K,) centre
(the module updates its centre in place before backward runs) and O(rows) statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels.dino_reference import crop_counts, dino_loss, teacher_batch_center
from kernels.triton_runtime import DinoBlocks, backend_for, fp32_if_low, kernel_module, refuse_double_backward


def merge_slices(part: dict[str, Tensor], batch: int, n_crops: int, n_global: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Combine per-slice partials: (student lse (V*B,), teacher max (G*B,), teacher normaliser (G*B,),
    cross (G, V, B) = <q_g, s_v> / t_s)."""
    s_top = part["s_max"].amax(dim=0)  # (V*B,)
    lse = s_top + torch.log((part["s_sum"] * torch.exp(part["s_max"] - s_top)).sum(dim=0))  # (V*B,)
    t_top = part["t_max"].amax(dim=0)  # (G*B,)
    rescale = torch.exp(part["t_max"] - t_top)  # (S, G*B)
    t_norm = (part["t_sum"] * rescale).sum(dim=0)  # (G*B,)
    slices = rescale.shape[0]
    w = part["w"].view(slices, n_global, n_crops, batch)  # (S, G, V, B)
    cross = (w * rescale.view(slices, n_global, 1, batch)).sum(dim=0) / t_norm.view(n_global, 1, batch)  # (G, V, B)
    return lse, t_top, t_norm, cross


class DinoLossFunction(torch.autograd.Function):
    """(loss fp32 scalar, teacher column sum (1, K) fp32); the gradient flows to the student logits only."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, center: Tensor, student_temp: float, teacher_temp: float,
                n_global: int, blocks: DinoBlocks) -> tuple[Tensor, Tensor]:
        k = kernel_module("dino_kernels")
        batch, n_crops, n_pairs = crop_counts(student, teacher, n_global)
        center = center.detach().reshape(-1).to(torch.float32, copy=True)  # (K,) frozen for backward
        part = k.dino_forward(student, teacher, center, student_temp, teacher_temp, n_global, batch, blocks)
        lse, t_max, t_norm, cross = merge_slices(part, batch, n_crops, n_global)
        pair_ce = (lse.view(1, n_crops, batch) - cross).sum(dim=-1)  # (G, V) sum over images of CE(q_g, p_v)
        same_crop = torch.eye(n_global, n_crops, dtype=torch.bool, device=pair_ce.device)  # (G, V)
        loss = pair_ce.masked_fill(same_crop, 0.0).sum() / (n_pairs * batch)
        batch_sum = part["colsum"].sum(dim=0, keepdim=True)  # (1, K)
        ctx.save_for_backward(student, teacher, center, lse, t_max, t_norm)
        ctx.meta = (student_temp, teacher_temp, n_global, batch, n_pairs, blocks)
        ctx.mark_non_differentiable(batch_sum)
        return loss, batch_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_sum: Optional[Tensor]):
        refuse_double_backward()
        student_temp, teacher_temp, n_global, batch, n_pairs, blocks = ctx.meta
        student, teacher, center, lse, t_max, t_norm = ctx.saved_tensors
        coef = grad_loss.detach().float().reshape(1) / (n_pairs * batch * student_temp)  # (1,)
        grad = kernel_module("dino_kernels").dino_backward(student, teacher, center, lse, t_max, t_norm, coef,
                                                           student_temp, teacher_temp, n_global, batch, blocks)
        return grad, None, None, None, None, None, None


def dino_loss_and_center_sum(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, student_temp: float,
                             teacher_temp: float, n_global_crops: int, blocks: Optional[DinoBlocks] = None
                             ) -> tuple[Tensor, Tensor]:
    """(``dino_loss`` value, teacher row sum (1, K)) through the fused kernels when they can run here.

    Logits: fp32, bf16 or fp16 (read as they are, computed in fp32). Otherwise, or on CPU without
    TRITON_INTERPRET=1, the reference and ``teacher_batch_center`` run on fp32 copies of low-precision inputs.
    """
    crop_counts(student_logits, teacher_logits, n_global_crops)
    K = student_logits.shape[1]
    if teacher_logits.shape[1] != K or center.numel() != K:
        raise ValueError(f"prototype counts differ: student {K}, teacher {teacher_logits.shape[1]}, "
                         f"centre {center.numel()}")
    if backend_for("dino_kernels", student_logits, teacher_logits) is None:
        student, teacher = fp32_if_low(student_logits), fp32_if_low(teacher_logits)
        loss = dino_loss(student, teacher, center, student_temp, teacher_temp, n_global_crops)
        return loss, teacher_batch_center(teacher)
    return DinoLossFunction.apply(student_logits.contiguous(), teacher_logits.detach().contiguous(), center,
                                  float(student_temp), float(teacher_temp), n_global_crops, blocks or DinoBlocks())


def dino_loss_triton(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, student_temp: float,
                     teacher_temp: float, n_global_crops: int, blocks: Optional[DinoBlocks] = None) -> Tensor:
    """``dino_loss`` (same signature) through the fused kernels; see ``dino_loss_and_center_sum``."""
    return dino_loss_and_center_sum(student_logits, teacher_logits, center, student_temp, teacher_temp,
                                    n_global_crops, blocks)[0]

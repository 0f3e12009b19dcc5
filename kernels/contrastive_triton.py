"""Fused CLIP (InfoNCE) loss: tiled Triton forward and backward that never store the B x N logits.

Same signature and value as ``kernels.contrastive_reference.clip_loss`` (the reference beside it): rank-local
rows (B, D) against gathered rows (N, D), positives at ``offset + i``. Each direction (image -> text,
text -> image) is one row-wise cross-entropy of local rows against gathered rows:

    forward   one pass over the (B, N) tiles per direction: online log-sum-exp -> lse (B,), positive dot (B,)
    backward  two passes per direction, logits recomputed tile by tile from the saved features and lse:
              rows -> d local (B, D) and the logit-scale partials; columns -> d gathered (N, D)

Saved for backward: the four feature tensors (no copies), lse (2 x B fp32) and the scale. The gathered
gradient flows back to its owner rank through the autograd all-gather in ``train/losses``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kernels.contrastive_reference import _check_local_vs_all, clip_loss
from kernels.triton_runtime import PairwiseBlocks, backend_for, fp32_if_low, kernel_module, refuse_double_backward


class ClipLossFunction(torch.autograd.Function):
    """Symmetric InfoNCE over (local, gathered) features of one dtype; returns an fp32 scalar."""

    @staticmethod
    def forward(ctx, image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                logit_scale: Tensor, offset: int, blocks: PairwiseBlocks) -> Tensor:
        k = kernel_module("pairwise_kernels")
        scale = logit_scale.detach().reshape(1).float()  # (1,)
        lse_i, pos_i = k.pairwise_forward(image_local, text_all, scale, None, offset, k.SOFTMAX, blocks)  # (B,) x2
        lse_t, pos_t = k.pairwise_forward(text_local, image_all, scale, None, offset, k.SOFTMAX, blocks)  # (B,) x2
        loss = 0.5 * ((lse_i - scale * pos_i).mean() + (lse_t - scale * pos_t).mean())
        ctx.save_for_backward(image_local, text_local, image_all, text_all, scale, lse_i, lse_t)
        ctx.offset, ctx.blocks, ctx.scale_like = offset, blocks, (logit_scale.shape, logit_scale.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        refuse_double_backward()
        k = kernel_module("pairwise_kernels")
        image_local, text_local, image_all, text_all, scale, lse_i, lse_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        kappa = grad.detach().float().reshape(1) * (0.5 / image_local.shape[0])  # (1,) d loss / d sum of row terms
        coef = kappa * scale  # (1,) d loss / d sum of feature dots
        d_img, d_txt_all, ws_i, _ = k.pairwise_backward(image_local, text_all, scale, None, lse_i, ctx.offset,
                                                        k.SOFTMAX, coef, need[3], ctx.blocks)
        d_txt, d_img_all, ws_t, _ = k.pairwise_backward(text_local, image_all, scale, None, lse_t, ctx.offset,
                                                        k.SOFTMAX, coef, need[2], ctx.blocks)
        d_scale = None
        if need[4]:
            shape, dtype = ctx.scale_like
            d_scale = (kappa * (ws_i.sum() + ws_t.sum())).reshape(shape).to(dtype)
        return (d_img if need[0] else None, d_txt if need[1] else None, d_img_all, d_txt_all, d_scale, None, None)


def clip_loss_triton(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                     logit_scale: Tensor, offset: int, blocks: Optional[PairwiseBlocks] = None) -> Tensor:
    """``clip_loss`` through the fused kernels when they can run here (see kernels/triton_runtime.py).

    Features: fp32, bf16 or fp16 (computed in fp32; the loss is fp32). Otherwise, or on CPU without
    TRITON_INTERPRET=1, the reference runs on fp32 copies of low-precision inputs.
    """
    if image_local.shape[0] != text_local.shape[0]:
        raise ValueError(f"{image_local.shape[0]} local images but {text_local.shape[0]} local texts: CLIP pairs them")
    _check_local_vs_all(image_local, text_all, offset, "image_local/text_all")
    _check_local_vs_all(text_local, image_all, offset, "text_local/image_all")
    feats = (image_local, text_local, image_all, text_all)
    if backend_for("pairwise_kernels", *feats) is None:
        return clip_loss(*(fp32_if_low(x) for x in feats), logit_scale, offset)
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in feats))
    feats = tuple(x.to(dtype).contiguous() for x in feats)
    return ClipLossFunction.apply(*feats, logit_scale, offset, blocks or PairwiseBlocks())

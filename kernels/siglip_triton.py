"""Fused SigLIP (sigmoid) loss: tiled Triton forward and backward with the bias, no B x N matrix.

Same signature and value as ``kernels.contrastive_reference.siglip_loss`` (the reference beside it):
-sum_ij logsigmoid(y_ij (scale <img_i, txt_j> + bias)) / B over this rank's images against the gathered texts.

    forward   one pass over the (B, N) tiles: per-row sum of softplus(-y z) (stable, log1p-accurate)
    backward  rows pass -> d images (B, D) and the scale / bias partials; columns pass -> d texts (N, D);
              logits recomputed from the saved features

Saved for backward: the two feature tensors (no copies) and the scale / bias values. Across ranks the
texts arrive by the autograd all-gather in ``train/losses`` (the gradient returns to the owner rank).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels.contrastive_reference import _check_local_vs_all, siglip_loss
from kernels.triton_runtime import PairwiseBlocks, backend_for, fp32_if_low, kernel_module, refuse_double_backward


class SigLipLossFunction(torch.autograd.Function):
    """Sigmoid loss of local images (B, D) against gathered texts (N, D) of one dtype; returns an fp32 scalar."""

    @staticmethod
    def forward(ctx, image_local: Tensor, text_all: Tensor, logit_scale: Tensor, logit_bias: Tensor, offset: int,
                blocks: PairwiseBlocks) -> Tensor:
        k = kernel_module("pairwise_kernels")
        scale = logit_scale.detach().reshape(1).float()  # (1,)
        bias = logit_bias.detach().reshape(1).float()  # (1,)
        row_loss, _ = k.pairwise_forward(image_local, text_all, scale, bias, offset, k.SIGMOID, blocks)  # (B,)
        ctx.save_for_backward(image_local, text_all, scale, bias)
        ctx.offset, ctx.blocks = offset, blocks
        ctx.like = ((logit_scale.shape, logit_scale.dtype), (logit_bias.shape, logit_bias.dtype))
        return row_loss.sum() / image_local.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        refuse_double_backward()
        k = kernel_module("pairwise_kernels")
        image_local, text_all, scale, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        kappa = grad.detach().float().reshape(1) / image_local.shape[0]  # (1,) d loss / d sum of pair terms
        d_img, d_txt, ws, wsum = k.pairwise_backward(image_local, text_all, scale, bias, None, ctx.offset,
                                                     k.SIGMOID, kappa * scale, need[1], ctx.blocks)
        (scale_shape, scale_dtype), (bias_shape, bias_dtype) = ctx.like
        d_scale = (kappa * ws.sum()).reshape(scale_shape).to(scale_dtype) if need[2] else None
        d_bias = (kappa * wsum.sum()).reshape(bias_shape).to(bias_dtype) if need[3] else None
        return d_img if need[0] else None, d_txt, d_scale, d_bias, None, None


def siglip_loss_triton(image_local: Tensor, text_all: Tensor, logit_scale: Tensor, logit_bias: Tensor, offset: int,
                       blocks: Optional[PairwiseBlocks] = None) -> Tensor:
    """``siglip_loss`` through the fused kernels when they can run here (see kernels/triton_runtime.py)."""
    _check_local_vs_all(image_local, text_all, offset, "image_local/text_all")
    if backend_for("pairwise_kernels", image_local, text_all) is None:
        return siglip_loss(fp32_if_low(image_local), fp32_if_low(text_all), logit_scale, logit_bias, offset)
    dtype = torch.promote_types(image_local.dtype, text_all.dtype)
    image_local, text_all = image_local.to(dtype).contiguous(), text_all.to(dtype).contiguous()
    return SigLipLossFunction.apply(image_local, text_all, logit_scale, logit_bias, offset, blocks or PairwiseBlocks())

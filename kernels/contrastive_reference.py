"""Plain-PyTorch reference math for the CLIP (softmax InfoNCE) and SigLIP (sigmoid) losses.

Both losses use the "local" form: each rank scores only its own B rows against the N = world * B
gathered rows, so memory is O(B x N) and never O(N x N). The rank's own rows sit at
[offset, offset + B) of the gathered tensors, which is where the positives are.

A fused kernel with the same signatures may sit beside this module (selected by ``loss.impl``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_local_vs_all(local: Tensor, gathered: Tensor, offset: int, names: str) -> None:
    """Raise a ValueError when a (B, D) local / (N, D) gathered pair cannot hold rows [offset, offset+B)."""
    if local.dim() != 2 or gathered.dim() != 2:
        raise ValueError(f"{names}: expected 2-D features, got {tuple(local.shape)} and {tuple(gathered.shape)}")
    if local.shape[1] != gathered.shape[1]:
        raise ValueError(f"{names}: feature dims differ ({local.shape[1]} vs {gathered.shape[1]})")
    if offset < 0 or offset + local.shape[0] > gathered.shape[0]:
        raise ValueError(
            f"{names}: local rows [{offset}, {offset + local.shape[0]}) fall outside the "
            f"{gathered.shape[0]} gathered rows"
        )


def clip_loss(
    image_local: Tensor,
    text_local: Tensor,
    image_all: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    offset: int,
) -> Tensor:
    """Symmetric InfoNCE over this rank's rows against all gathered rows (open_clip "local loss").

    Args:
        image_local: (B, D) this rank's L2-normalised image features.
        text_local: (B, D) this rank's L2-normalised text features.
        image_all: (N, D) image features gathered from every rank.
        text_all: (N, D) text features gathered from every rank.
        logit_scale: scalar tensor, already exponentiated and clamped; receives a gradient.
        offset: index of this rank's first row in the gathered tensors.

    Returns:
        Scalar loss: (CE(image -> text) + CE(text -> image)) / 2, each a mean over the B rows.
    """
    _check_local_vs_all(image_local, text_all, offset, "image_local/text_all")
    _check_local_vs_all(text_local, image_all, offset, "text_local/image_all")
    batch = image_local.shape[0]
    labels = torch.arange(offset, offset + batch, device=image_local.device)  # (B,)
    logits_per_image = logit_scale * (image_local @ text_all.t())  # (B, N)
    logits_per_text = logit_scale * (text_local @ image_all.t())  # (B, N)
    loss_image = F.cross_entropy(logits_per_image, labels)
    loss_text = F.cross_entropy(logits_per_text, labels)
    return (loss_image + loss_text) / 2


def siglip_loss(
    image_local: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    offset: int,
) -> Tensor:
    """Sigmoid pairwise loss of this rank's images against all gathered texts.

    Pair (i, offset + i) is positive (+1), every other pair negative (-1);
    loss = -sum(logsigmoid(label * (scale * img @ txt.T + bias))) / B.
    Averaging this over ranks gives the single-process loss on the global batch.

    Args:
        image_local: (B, D) this rank's L2-normalised image features.
        text_all: (N, D) text features gathered from every rank.
        logit_scale: scalar tensor, already exponentiated; receives a gradient.
        logit_bias: scalar tensor; receives a gradient.
        offset: index of this rank's first row in text_all.
    """
    _check_local_vs_all(image_local, text_all, offset, "image_local/text_all")
    batch, num_texts = image_local.shape[0], text_all.shape[0]
    logits = logit_scale * (image_local @ text_all.t()) + logit_bias  # (B, N)
    rows = torch.arange(batch, device=image_local.device)  # (B,)
    signs = torch.full((batch, num_texts), -1.0, dtype=logits.dtype, device=logits.device)  # (B, N)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch

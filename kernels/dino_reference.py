"""Plain-PyTorch reference math for the DINO self-distillation loss and its teacher centring.

Matches facebookresearch/dino ``DINOLoss``: cross-entropy between the centred, sharpened teacher
distribution on each global crop and the student distribution on every *other* crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global_crops: int,
) -> Tensor:
    """DINO cross-entropy averaged over all (teacher crop, different student crop) pairs.

    Args:
        student_logits: (n_crops * B, K) crop-major (every image's crop 0, then crop 1, ...);
            the first ``n_global_crops`` crops are the global ones.
        teacher_logits: (n_global_crops * B, K) crop-major teacher outputs; no gradient flows.
        center: (1, K) running teacher centre.
        student_temp: student softmax temperature.
        teacher_temp: teacher softmax temperature (usually scheduled by the caller).
        n_global_crops: number of global crops the teacher saw.

    Returns:
        Scalar loss: mean over pairs (iq, v), v != iq, of mean_b sum_k -q[iq, b, k] * log p[v, b, k].
    """
    batch, n_crops, n_pairs = crop_counts(student_logits, teacher_logits, n_global_crops)
    num_classes = student_logits.shape[1]

    student_log_probs = F.log_softmax(student_logits / student_temp, dim=-1)  # (V*B, K)
    student_log_probs = student_log_probs.view(n_crops, batch, num_classes)  # (V, B, K)
    teacher_probs = F.softmax((teacher_logits.detach() - center) / teacher_temp, dim=-1)  # (G*B, K)
    teacher_probs = teacher_probs.view(n_global_crops, batch, num_classes)  # (G, B, K)

    # cross[g, v] = mean_b sum_k -q[g, b, k] * log p[v, b, k]
    cross = -torch.einsum("gbk,vbk->gv", teacher_probs, student_log_probs) / batch  # (G, V)
    same_crop = torch.eye(n_global_crops, n_crops, dtype=torch.bool, device=cross.device)  # (G, V)
    return cross.masked_fill(same_crop, 0.0).sum() / n_pairs


@torch.no_grad()
def teacher_batch_center(teacher_logits: Tensor) -> Tensor:
    """Row sum of the teacher logits, (1, K); the caller all-reduces it and divides by the total rows."""
    return teacher_logits.detach().sum(dim=0, keepdim=True)  # (1, K)


@torch.no_grad()
def update_center(center: Tensor, batch_center_mean: Tensor, momentum: float) -> Tensor:
    """EMA step of the teacher centre: center * momentum + batch_center_mean * (1 - momentum)."""
    return center * momentum + batch_center_mean * (1.0 - momentum)  # (1, K)


def crop_counts(student_logits: Tensor, teacher_logits: Tensor, n_global_crops: int) -> tuple[int, int, int]:
    """(batch, n_crops, n_pairs), checked; a clear error for shapes that do not fit."""
    if teacher_logits.shape[0] % n_global_crops != 0:
        raise ValueError(
            f"teacher rows ({teacher_logits.shape[0]}) not divisible by n_global_crops ({n_global_crops})")
    batch = teacher_logits.shape[0] // n_global_crops
    if batch == 0 or student_logits.shape[0] % batch != 0:
        raise ValueError(f"student rows ({student_logits.shape[0]}) not a multiple of the batch size ({batch})")
    n_crops = student_logits.shape[0] // batch
    if n_crops < n_global_crops:
        raise ValueError(f"student has {n_crops} crops, fewer than the {n_global_crops} global crops")
    n_pairs = n_global_crops * n_crops - n_global_crops
    if n_pairs == 0:
        raise ValueError("DINO loss needs at least two crops (no pair of different crops)")
    return batch, n_crops, n_pairs

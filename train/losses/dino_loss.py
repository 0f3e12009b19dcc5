"""DINO self-distillation loss module with its teacher centre (a checkpointed buffer)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels.dino_reference import dino_loss, teacher_batch_center, update_center
from train.losses.distributed import all_reduce_sum_, world_size

DINO_LOSS_IMPLS = {"torch": dino_loss}


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, as in facebookresearch/dino.

    ``center`` is a persistent (1, K) buffer, so it is saved in state_dict and checkpoints.
    forward() uses the current centre, then updates it from the teacher logits (DINO's order).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        impl: str = "torch",
    ) -> None:
        super().__init__()
        if impl not in DINO_LOSS_IMPLS:
            raise ValueError(f"unknown DINOLoss impl {impl!r}; valid: {sorted(DINO_LOSS_IMPLS)}")
        self.out_dim = out_dim
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self._loss_fn = DINO_LOSS_IMPLS[impl]
        self.register_buffer("center", torch.zeros(1, out_dim), persistent=True)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """student_logits: (n_crops * B, K) crop-major; teacher_logits: (n_global_crops * B, K)."""
        loss = self._loss_fn(
            student_logits, teacher_logits, self.center, self.student_temp, teacher_temp, self.n_global_crops
        )
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA update of the centre with the teacher mean over every rank's rows (same row count per rank)."""
        batch_sum = teacher_batch_center(teacher_logits)  # (1, K)
        batch_center_mean = all_reduce_sum_(batch_sum) / (teacher_logits.shape[0] * world_size())  # (1, K)
        self.center.copy_(update_center(self.center, batch_center_mean, self.center_momentum))

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, n_global_crops={self.n_global_crops}, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, impl={self.impl!r}"
        )

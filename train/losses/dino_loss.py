"""DINO self-distillation loss module with its teacher centre (a checkpointed buffer)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels.dino_reference import dino_loss, teacher_batch_center, update_center
from kernels.dino_triton import dino_loss_and_center_sum, dino_loss_triton
from train.losses.distributed import all_reduce_sum_, world_size

DINO_LOSS_IMPLS = {"torch": dino_loss, "triton": dino_loss_triton}  # triton: fused, falls back to torch on CPU


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, as in facebookresearch/dino.

    ``center`` is a persistent (1, K) buffer, so it is saved in state_dict and checkpoints.
    forward() uses the current centre, then updates it from the teacher logits (DINO's order). With
    ``deferred_center=True`` forward() only accumulates the teacher row sums, and ``commit_center()`` applies one
    update per optimizer step (what the trainer does: the centre then does not depend on gradient accumulation,
    and ``discard_center()`` drops a skipped step's rows).
    With impl="triton" the fused kernel also returns the teacher row sum the update needs (summed in fp32
    inside the kernel, so it may differ from torch's sum in the last bits); the update itself is the same.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        impl: str = "torch",
        deferred_center: bool = False,
    ) -> None:
        super().__init__()
        if impl not in DINO_LOSS_IMPLS:
            raise ValueError(f"unknown DINOLoss impl {impl!r}; valid: {sorted(DINO_LOSS_IMPLS)}")
        self.out_dim = out_dim
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self.native_dtype = impl == "triton"  # the fused kernel reads bf16 logits as they are (callers skip .float())
        self._loss_fn = DINO_LOSS_IMPLS[impl]
        self.register_buffer("center", torch.zeros(1, out_dim), persistent=True)
        self.deferred_center = deferred_center
        self._pending_sum: Tensor | None = None  # (1, K) fp32 teacher row sum of this step's micro-batches
        self._pending_rows = 0

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """student_logits: (n_crops * B, K) crop-major; teacher_logits: (n_global_crops * B, K)."""
        if self.impl == "triton":
            loss, batch_sum = dino_loss_and_center_sum(
                student_logits, teacher_logits, self.center, self.student_temp, teacher_temp, self.n_global_crops
            )
            self.update_center_from_sum(batch_sum, teacher_logits.shape[0])
            return loss
        # Autocast off: the reference sums q * log p over K in fp32, as DINO's loss does under its fp16 autocast
        # (an elementwise product and a sum); left on, the einsum would run as a bf16 bmm (inputs rounded to bf16).
        with torch.autocast(student_logits.device.type, enabled=False):
            loss = self._loss_fn(
                _at_least_fp32(student_logits), _at_least_fp32(teacher_logits), self.center, self.student_temp,
                teacher_temp, self.n_global_crops,
            )
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA update of the centre with the teacher mean over every rank's rows (same row count per rank)."""
        self.update_center_from_sum(teacher_batch_center(teacher_logits), teacher_logits.shape[0])

    @torch.no_grad()
    def update_center_from_sum(self, batch_sum: Tensor, rows: int) -> None:
        """EMA update from this rank's teacher row sum (1, K) over ``rows`` rows (all-reduced here); deferred: kept
        for ``commit_center``."""
        if self.deferred_center:
            batch_sum = batch_sum.detach().to(self.center.dtype)
            self._pending_sum = batch_sum if self._pending_sum is None else self._pending_sum + batch_sum
            self._pending_rows += rows
            return
        self._ema_update(batch_sum, rows)

    @torch.no_grad()
    def commit_center(self) -> None:
        """Collective (every rank, once per optimizer step): one EMA update from the step's accumulated rows."""
        if self._pending_sum is None:
            return
        self._ema_update(self._pending_sum, self._pending_rows)
        self.discard_center()

    def discard_center(self) -> None:
        self._pending_sum, self._pending_rows = None, 0

    def _ema_update(self, batch_sum: Tensor, rows: int) -> None:
        batch_center_mean = all_reduce_sum_(batch_sum) / (rows * world_size())  # (1, K)
        self.center.copy_(update_center(self.center, batch_center_mean, self.center_momentum))

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, n_global_crops={self.n_global_crops}, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, impl={self.impl!r}"
        )


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # fp64 (tests) stays fp64

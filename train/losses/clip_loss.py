"""CLIP contrastive loss module: gathers features across ranks, delegates the math to kernels/."""
from __future__ import annotations

from torch import Tensor, nn

from kernels.contrastive_reference import clip_loss
from kernels.contrastive_triton import clip_loss_triton
from train.losses.distributed import gather_with_grad

CLIP_LOSS_IMPLS = {"torch": clip_loss, "triton": clip_loss_triton}  # triton: fused, falls back to torch on CPU


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, computed in open_clip's local-loss form.

    Each rank returns the loss of its own rows against all gathered rows; the mean of these
    over ranks equals the single-process loss on the global batch, and the gather keeps the
    gradient path so DDP / DeepSpeed gradient averaging yields the global-batch gradient.
    """

    def __init__(self, impl: str = "torch", check_sizes: bool = True) -> None:
        super().__init__()
        if impl not in CLIP_LOSS_IMPLS:
            raise ValueError(f"unknown ClipLoss impl {impl!r}; valid: {sorted(CLIP_LOSS_IMPLS)}")
        self.impl = impl
        self.native_dtype = impl == "triton"  # the fused kernel reads bf16 features as they are (callers skip .float())
        self.check_sizes = check_sizes
        self._loss_fn = CLIP_LOSS_IMPLS[impl]

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        """image_features, text_features: (B, D) L2-normalised; logit_scale: exponentiated scalar."""
        image_all, offset = gather_with_grad(image_features, self.check_sizes)  # (N, D)
        text_all, _ = gather_with_grad(text_features, self.check_sizes)  # (N, D)
        return self._loss_fn(image_features, text_features, image_all, text_all, logit_scale, offset)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"

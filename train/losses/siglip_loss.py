"""SigLIP sigmoid loss module: gathers texts across ranks, delegates the math to kernels/."""
from __future__ import annotations

from torch import Tensor, nn

from kernels.contrastive_reference import siglip_loss
from kernels.siglip_triton import siglip_loss_triton
from train.losses.distributed import gather_with_grad

SIGLIP_LOSS_IMPLS = {"torch": siglip_loss, "triton": siglip_loss_triton}  # triton: fused, falls back to torch on CPU


class SigLipLoss(nn.Module):
    """Sigmoid loss of this rank's images against the texts of every rank.

    The mean over ranks equals the single-process loss on the global batch; the text gather
    keeps the gradient path (all_gather here rather than SigLIP's ring of permutes).
    """

    def __init__(self, impl: str = "torch", check_sizes: bool = True) -> None:
        super().__init__()
        if impl not in SIGLIP_LOSS_IMPLS:
            raise ValueError(f"unknown SigLipLoss impl {impl!r}; valid: {sorted(SIGLIP_LOSS_IMPLS)}")
        self.impl = impl
        self.native_dtype = impl == "triton"  # the fused kernel reads bf16 features as they are (callers skip .float())
        self.check_sizes = check_sizes
        self._loss_fn = SIGLIP_LOSS_IMPLS[impl]

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        """image_features, text_features: (B, D) L2-normalised; logit_scale (exponentiated), logit_bias: scalars."""
        text_all, offset = gather_with_grad(text_features, self.check_sizes)  # (N, D)
        return self._loss_fn(image_features, text_all, logit_scale, logit_bias, offset)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"

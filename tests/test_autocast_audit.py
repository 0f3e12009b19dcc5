"""The fp32 islands of the bf16 autocast audit (docs/benchmarks.md, "bf16 autocast audit") that our code sets itself.

CPU autocast (bf16) is used: its lower-precision list has the matmuls (mm, bmm, linear, conv) as CUDA's does, so a
loss that leaves an fp32 island to autocast would show bf16 rounding here too. What CUDA's fp32 list adds
(layer_norm, softmax, norm, sum, ...) is torch's, not ours, and is not tested here.
"""
from __future__ import annotations

import torch

from train.losses.clip_loss import ClipLoss
from train.losses.dino_loss import DINOLoss


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_dino_torch_loss_sums_in_fp32_under_autocast():
    """DINO's loss (facebookresearch/dino) sums -q * log p over K in fp32; the reference's einsum must not become a
    bf16 bmm under autocast."""
    torch.manual_seed(0)
    k, batch = 4096, 8
    student = torch.randn(4 * batch, k) * 3  # (V*B, K): 2 global + 2 local crops
    teacher = torch.randn(2 * batch, k) * 3  # (G*B, K)
    fp32 = DINOLoss(k, n_global_crops=2)(student, teacher, 0.04)
    with _bf16_autocast():
        mixed = DINOLoss(k, n_global_crops=2)(student, teacher, 0.04)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, rtol=1e-6, atol=1e-6)


def test_dino_center_stays_fp32_under_autocast():
    loss_fn = DINOLoss(256, n_global_crops=2, center_momentum=0.9)
    with _bf16_autocast():
        loss_fn(torch.randn(8, 256), torch.randn(4, 256), 0.04)
    assert loss_fn.center.dtype == torch.float32 and torch.isfinite(loss_fn.center).all()


def test_clip_torch_loss_logits_follow_open_clip_under_autocast():
    """open_clip computes `logit_scale * image @ text.T` inside autocast: bf16 logits, fp32 cross-entropy. Ours does
    the same with impl=torch (the loss is fp32, within bf16 rounding of the fp32 loss; not equal to it)."""
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1)
    scale = torch.tensor(100.0)
    fp32 = ClipLoss()(image, text, scale)
    with _bf16_autocast():
        mixed = ClipLoss()(image, text, scale)
    assert mixed.dtype == torch.float32
    assert not torch.equal(mixed, fp32)  # the logits were rounded to bf16, as open_clip's are
    torch.testing.assert_close(mixed, fp32, rtol=2e-2, atol=2e-2)


def test_fused_contrastive_loss_gets_autocast_dtype_features():
    """F.normalize runs in fp32 under CUDA autocast: the fused kernels must still get bf16 operands (tensor cores),
    as torch's `image @ text.T` would; without autocast they get the features as they are."""
    from train.objectives.contrastive import contrastive_loss_terms

    class RecordingLoss:
        native_dtype = True
        seen: list = []

        def __call__(self, image, text, scale):
            self.seen.append((image.dtype, text.dtype, scale.dtype))
            return (image.float() @ text.float().t()).diagonal().mean() * scale

    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)  # fp32, as CUDA autocast leaves them
    out = {"image_features": features, "text_features": features.clone(), "logit_scale": torch.tensor(10.0)}
    loss_fn = RecordingLoss()
    with _bf16_autocast():
        contrastive_loss_terms(loss_fn, out, sigmoid=False)
    contrastive_loss_terms(loss_fn, out, sigmoid=False)
    assert loss_fn.seen == [(torch.bfloat16, torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32, torch.float32)]

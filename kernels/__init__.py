"""Loss math: plain PyTorch references (`*_reference.py`) and fused Triton kernels beside them, selected by `loss.impl`."""

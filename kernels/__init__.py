"""Loss math: plain PyTorch references (and, later, fused kernels) selected by config."""

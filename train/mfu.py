"""Peak FLOP/s per device (the MFU denominator) and memory readings.

GPU peaks are the vendors' dense (no sparsity) tensor-core numbers for the precision trained in.
A CPU has no honest datasheet number for PyTorch, so its "peak" is measured: the best fp32 GEMM
rate of this machine with the threads torch uses (cached per process). Override with
`logging.peak_flops=...`.
"""
from __future__ import annotations

import resource
import time
from functools import lru_cache

import torch

# device-name substring -> (bf16 dense, fp32 non-tensor-core) FLOP/s
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "H800": (989e12, 67e12),
    "GH200": (989e12, 67e12),
    "B200": (2250e12, 80e12),
    "A100": (312e12, 19.5e12),
    "A800": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),  # fp16 tensor cores (no bf16)
}


@lru_cache(maxsize=None)
def measured_cpu_gemm_flops(size: int = 1024, seconds: float = 0.5) -> float:
    gen = torch.Generator().manual_seed(0)  # leave the global RNG alone (exact resume depends on it)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    torch.mm(a, b)  # warm-up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return float(override), "config logging.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAKS.items():
            if key in name:
                return (bf16 if precision == "bf16" else fp32), f"datasheet {key} {precision}"
        return 0.0, f"unknown GPU {name!r}: set logging.peak_flops"
    return measured_cpu_gemm_flops(), f"measured fp32 GEMM on {torch.get_num_threads()} CPU threads"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

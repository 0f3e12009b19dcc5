"""NVIDIA DALI backend (`data.backend=dali`): webdataset shards decoded and augmented by DALI pipelines.

- `index.py`: the DALI index files of the shards (`wds2idx`, shipped with DALI), made once and reused.
- `pipelines.py`: CLIP view, DINO multi-crop and eval pipelines (CPU-only or GPU decoding).
- `loader.py`: `DaliLoader`, the same `Batch` stream and `state_dict()` API as the CPU loader.

DALI is an optional dependency (`pip install nvidia-dali-cuda130`, or the build matching your CUDA;
see docs/data.md); importing this package does not import DALI.
"""
from __future__ import annotations

from data.shards import DataError

INSTALL_HINT = ("pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12, "
                "see docs/data.md), or use data.backend=cpu")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """Raise a one-line DataError when DALI is not installed."""
    if not dali_available():
        raise DataError(f"data.backend=dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}")

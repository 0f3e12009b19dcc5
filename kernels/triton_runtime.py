"""Where the fused Triton loss kernels run, and the helpers they share.

``backend_for(module, *tensors)`` decides, per call, which path a ``loss.impl=triton`` loss takes:

* CUDA tensors -> ``"compiled"``: the Triton kernels, compiled for the GPU;
* CPU tensors with ``TRITON_INTERPRET=1`` in the environment -> ``"interpreter"``: the same kernels run in
  Triton's interpreter on the CPU (how the tests exercise them). The kernel modules are imported lazily, at
  the first such call, because Triton decides between compiling and interpreting when a kernel is defined;
* anything else (CPU without ``TRITON_INTERPRET``, no triton, fp64 inputs, ...) -> ``None``: the caller uses
  the plain-PyTorch reference, and one warning per reason says so.

``LAUNCHES`` counts kernel launches per kernel name, so tests can check that the kernels really ran.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger("clipdino.kernels")
LAUNCHES: Counter = Counter()  # kernel name -> launches in this process
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read (they compute in fp32)
_warned: set[str] = set()


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_module(name: str) -> ModuleType:
    """Import ``kernels.<name>`` (the module holding @triton.jit kernels) on first use."""
    return importlib.import_module(f"kernels.{name}")


def jit_is_interpreted(fn: object) -> bool:
    """Whether a @triton.jit function was defined under TRITON_INTERPRET=1 (Triton decides at definition)."""
    return type(fn).__name__ == "InterpretedFunction"


def triton_library_interpreted() -> Optional[bool]:
    """The mode of Triton's own @jit library (triton.language.standard), fixed when triton was imported;
    None when triton is not imported yet. Kernels can only be interpreted if this is True."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    return any(jit_is_interpreted(v) for v in vars(standard).values())


def is_interpreted(module: ModuleType) -> bool:
    """Whether the module's kernels were defined under TRITON_INTERPRET=1 (fixed at its import)."""
    return bool(getattr(module, "INTERPRETED", False))


def use_interpreter() -> None:
    """Run the kernels on CPU tensors from now on: set TRITON_INTERPRET=1 and re-import any kernel module
    that was already imported in compiled mode (tests, benchmarks)."""
    os.environ["TRITON_INTERPRET"] = "1"
    if triton_library_interpreted() is False:
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; set it before anything "
                           "imports triton (its own library cannot switch to the interpreter afterwards)")
    for name in ("kernels.triton_common", "kernels.pairwise_kernels", "kernels.dino_kernels"):
        module = sys.modules.get(name)
        if module is not None and not is_interpreted(module):
            importlib.reload(module)


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def backend_for(module_name: str, *tensors: Tensor) -> Optional[str]:
    """'compiled', 'interpreter', or None when the PyTorch reference must be used (warned once per reason)."""
    device = tensors[0].device
    bad_dtype = next((t.dtype for t in tensors if t.dtype not in KERNEL_DTYPES), None)
    if not triton_installed():
        reason = "triton is not installed"
    elif bad_dtype is not None:
        reason = f"{bad_dtype} inputs (the kernels read fp32, bf16 or fp16)"
    elif device.type == "cuda":
        return "interpreter" if is_interpreted(kernel_module(module_name)) else "compiled"
    elif device.type == "cpu" and not interpret_requested():
        reason = "CPU tensors without TRITON_INTERPRET=1"
    elif device.type == "cpu":
        if triton_library_interpreted() is not False and is_interpreted(kernel_module(module_name)):
            return "interpreter"
        reason = "triton (or the kernels) were imported before TRITON_INTERPRET=1 was set, so they cannot interpret"
    else:
        reason = f"device {device.type}"
    warn_once(f"{module_name}:{reason}", f"loss.impl=triton: {reason}; the PyTorch reference runs instead "
              f"of kernels.{module_name}")
    return None


def fp32_if_low(x: Tensor) -> Tensor:
    """bf16/fp16 -> fp32 (what the trainer hands the reference losses); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def dtype_kind(dtype: torch.dtype) -> int:
    """0 fp32, 1 bf16, 2 fp16: a constexpr the kernels use to round matmul operands and stores."""
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


def launch_options(backend: str, num_warps: int = 4, num_stages: int = 2) -> dict:
    """Compiler options for a launch (the interpreter ignores them)."""
    return {} if backend == "interpreter" else {"num_warps": num_warps, "num_stages": num_stages}


@dataclass(frozen=True)
class PairwiseBlocks:
    """CLIP / SigLIP tile sizes (powers of two, >= 16 on a GPU). Defaults: not timed on a GPU, but they compile
    for sm_90 without register spills (``python -m kernels.triton_aot``)."""
    m: int = 64  # local rows per tile
    n: int = 64  # gathered rows per tile
    k: int = 64  # slice of the feature dim per partial dot product
    d_out: int = 0  # gradient columns per program (larger D: logits recomputed per slice); 0: 128 bf16/fp16, 64 fp32
    num_warps: int = 8
    num_stages: int = 2

    def d_out_for(self, dtype: torch.dtype, dim: int) -> int:
        """The gradient slice for ``dim`` features of ``dtype``: at most the padded dim."""
        chosen = self.d_out or (64 if dtype == torch.float32 else 128)
        return min(chosen, max(16, 1 << max(0, dim - 1).bit_length()))


@dataclass(frozen=True)
class DinoBlocks:
    """DINO tile sizes: prototypes per program and images per forward program."""
    k: int = 256  # prototypes (columns of the B x K logits) per tile
    images: int = 16  # images per forward program (grid: K / k x B / images)
    num_warps: int = 8
    num_stages: int = 2


def refuse_double_backward() -> None:
    """Call first in a fused backward. Its gradients come from kernels and carry no graph, so under
    create_graph=True (autograd then runs backward with grad mode on) a gradient penalty would silently
    treat them as constants: refuse instead."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fused Triton losses do not support double backward (create_graph=True); "
                           "use loss.impl=torch")

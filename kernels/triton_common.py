"""@triton.jit helpers shared by the loss kernels (imported lazily, with them; see kernels/triton_runtime.py).

Numerics: every kernel computes in fp32. Matmul operands stay in the inputs' precision (bf16/fp16 tensor
cores on a GPU, fp32 with ``input_precision="ieee"`` for fp32 inputs). Triton's CPU interpreter cannot
multiply bf16 tiles and truncates fp32 -> bf16 casts, so under the interpreter (``INTERP``) operands are
rounded to the inputs' precision by hand (round to nearest even, as the GPU cast does) and multiplied in
fp32: bf16 x bf16 products are exact in fp32, so this is the GPU's arithmetic up to the summation order.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_runtime import jit_is_interpreted


@triton.jit
def rne_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), returned as fp32 (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def operand(x, KIND: tl.constexpr, INTERP: tl.constexpr):
    """An fp32 tile as a matmul operand of the inputs' precision (KIND 0 fp32, 1 bf16, 2 fp16)."""
    if KIND == 0:
        return x
    elif INTERP:
        if KIND == 1:
            return rne_bf16(x)
        else:
            return x.to(tl.float16).to(tl.float32)
    elif KIND == 1:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def mm(a, b, KIND: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with fp32 accumulation; a and b share the inputs' dtype (KIND), fp32 values under INTERP."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif KIND == 0:
        return tl.dot(a, b, input_precision="ieee")  # fp32 inputs: no TF32 rounding
    else:
        return tl.dot(a, b)  # bf16 / fp16 tensor cores


@triton.jit
def for_store(x, KIND: tl.constexpr, INTERP: tl.constexpr):
    """An fp32 tile converted for a store into a tensor of kind KIND, rounding to nearest even."""
    if KIND == 0:
        return x
    elif KIND == 1:
        if INTERP:
            return rne_bf16(x).to(tl.bfloat16)
        else:
            return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def softplus(x):
    """log(1 + exp(x)), stable for any x; log1p by Goldberg's trick (fp32 accurate without a log1p)."""
    t = tl.exp(-tl.abs(x))  # in (0, 1]
    u = 1.0 + t
    exact = u == 1.0  # t below fp32 resolution: log1p(t) = t
    log1p_t = tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p_t


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


INTERPRETED = jit_is_interpreted(rne_bf16)  # TRITON_INTERPRET=1 when these helpers were defined

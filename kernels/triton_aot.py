"""Compile every loss kernel for a GPU architecture without a GPU (Triton's compiler + its bundled ptxas).

    python -m kernels.triton_aot [--arch 90] [--json FILE]

Checks what the CPU interpreter cannot: that the compiled path (bf16 tensor-core dots, fp32 IEEE dots,
the constexpr branches) lowers to PTX and SASS for the target, and how many registers / how much spill
stack and shared memory each kernel needs with the default tiles. Must run in a process where triton was
imported without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional

from kernels.triton_runtime import DinoBlocks, PairwiseBlocks, interpret_requested

DTYPES = {"fp32": 0, "bf16": 1}
FEATURE_PTRS = ("a_ptr", "c_ptr", "da_ptr", "dc_ptr")
LOGIT_PTRS = ("s_ptr", "t_ptr", "ds_ptr")


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    """Argument types as the launchers pass them: feature / logit tensors in ``dtype``, other tensors fp32."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FEATURE_PTRS or name in LOGIT_PTRS:
            types[name] = "*" + dtype
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "fp32" if name.endswith("_temp") else "i32"
    return types


def _resources(cubin: bytes) -> Optional[dict[str, int]]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return None if match is None else dict(zip(("registers", "stack_bytes", "static_shared"), map(int, match.groups())))


def kernel_variants(feature_dim: int = 512, n_crops: int = 12, n_global: int = 2) -> list[tuple]:
    """(kernel, name, dtype, constexprs, launch options) for every kernel with the default tiles."""
    from kernels import dino_kernels as dk
    from kernels import pairwise_kernels as pk
    from kernels.triton_runtime import dtype_kind

    import torch

    out = []
    pair, dino = PairwiseBlocks(), DinoBlocks()
    for dtype, kind in DTYPES.items():
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        opts = {"num_warps": pair.num_warps, "num_stages": pair.num_stages}
        for mode, mode_name in ((pk.SOFTMAX, "softmax"), (pk.SIGMOID, "sigmoid")):
            base = dict(MODE=mode, BLOCK_M=pair.m, BLOCK_N=pair.n, BLOCK_K=pair.k, KIND=kind, INTERP=False)
            grad = dict(BLOCK_DO=pair.d_out_for(torch_dtype, feature_dim), KIND_OUT=dtype_kind(torch_dtype))
            out += [(pk._forward_kernel, f"pairwise_forward[{mode_name}]", dtype, base, opts),
                    (pk._backward_rows_kernel, f"pairwise_backward_rows[{mode_name}]", dtype, {**base, **grad}, opts),
                    (pk._backward_cols_kernel, f"pairwise_backward_cols[{mode_name}]", dtype, {**base, **grad}, opts)]
        common = dict(V=n_crops, G=n_global, VPAD=dk._vpad(n_crops), BLOCK_K=dino.k)
        opts = {"num_warps": dino.num_warps, "num_stages": dino.num_stages}
        out += [(dk._dino_forward_kernel, "dino_forward", dtype, {**common, "IMAGES": dino.images}, opts),
                (dk._dino_backward_kernel, "dino_backward", dtype, {**common, "KIND_OUT": kind, "INTERP": False}, opts)]
    return out


def compile_all(arch: int = 90) -> list[dict[str, Any]]:
    """Compile every variant for sm_<arch>; one dict per kernel (registers, spill stack, shared memory, MMA)."""
    if interpret_requested():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    report = []
    for fn, name, dtype, constexprs, opts in kernel_variants():
        src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=opts)
        ptx = compiled.asm["ptx"]
        report.append({"kernel": name, "dtype": dtype, "arch": f"sm_{arch}", **opts,
                       "dynamic_shared_bytes": compiled.metadata.shared,
                       "tensor_core_mma": "wgmma" in ptx or "mma.sync" in ptx,
                       **(_resources(compiled.asm["cubin"]) or {})})
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = compile_all(args.arch)
    for r in report:
        print(f"{r['kernel']:36s} {r['dtype']}  regs {r.get('registers', '?'):>3}  spill stack "
              f"{r.get('stack_bytes', '?'):>3} B  smem {r['dynamic_shared_bytes']:>6} B  mma {r['tensor_core_mma']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`model.compile=true`: `torch.compile` applied per transformer block, in place (torchtitan's `apply_compile`).

    compile_blocks(objective)   # the trainer, after configure_grad_checkpointing, before deepspeed.initialize

What is compiled: every block of every transformer tower the training step runs - the student's vision tower and
text tower (`models/transformer.Block`), the EMA teacher's backbone (DINO, hybrid: its forward is part of the step),
a frozen Hugging Face text tower's layers, and for the VLM the LLM's decoder layers and the vision tower's encoder
layers (Hugging Face classes, found as a `layers` / `layer` list of `*Layer` modules). Compiling per block rather than
the whole model is what torchtitan does: the blocks repeat, so Dynamo traces one block and the other blocks of the
same shape reuse the graph (its guards are on shapes and grad mode, not on the module), and the glue around the
blocks (patch embedding, pooling, multi-crop concatenation, the LLM's image-token splice) stays eager, with no graph
breaks to chase there.

What stays eager, and why: the DINO head (one call per step, a few Linears and a (B, d) x (d, K) matmul that is
BLAS-bound either way: nothing repeats for a compile to amortise), the projections and embeddings, and the losses
(`loss.impl=triton` keeps its own kernels, which must see the eager tensors; `loss.impl=torch` is a few ops).

How, so that everything else is unchanged:
  * `nn.Module.compile()` in place, not `torch.compile(module)`: the blocks stay where they were, so state_dict keys
    carry no `_orig_mod.` and checkpoints of compiled and eager runs load into each other (exact resume either way).
  * our `Block`: `fullgraph=True` (it has no graph break; off under ZeRO-3, whose parameter-gather hooks inside
    every block are compiler-disabled: the block then compiles in pieces) and `dynamic=False` (each step's shapes
    are fixed: DINO's global and local crops give two sequence lengths, i.e. two graphs, not one symbolic graph).
  * drop path reads its rate from a tensor under compile (models/transformer.DropPath): per-block rates would
    otherwise be graph constants, one compile per block.
    Hugging Face layers: `fullgraph=False`, `dynamic=None` (VLM batches vary in length: after a second length Dynamo
    makes it symbolic instead of recompiling for each).
  * gradient checkpointing wraps the compiled block (`run_blocks` calls `torch.utils.checkpoint` with
    use_reentrant=False around `block(x)`; HF's GradientCheckpointingLayer does the same): the recomputation in the
    backward reruns the compiled forward.
  * drop path draws its mask inside the compiled block: inductor's RNG is not eager's, so with
    `model.vision.drop_path > 0` compiled and eager runs differ by the masks drawn (each is correct on its own).

Needs a C++ compiler on CPU (inductor's C++ backend: g++ / c++ / clang++) and Triton on CUDA; checked up front.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator

import torch
import torch.nn as nn

from models.transformer import Block

HF_LAYER_LISTS = ("layers", "layer")  # LlamaDecoderLayer, Qwen2DecoderLayer, CLIPEncoderLayer, ViTLayer, BertLayer...


def compile_enabled(cfg) -> bool:
    return bool(getattr(getattr(cfg, "model", None), "compile", False))


def block_lists(root: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    """(name, blocks) of each list of transformer blocks under `root`: our `Block`s, or Hugging Face `*Layer`s."""
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1:
            continue
        kind = kinds.pop()
        if issubclass(kind, Block) or (name.rsplit(".", 1)[-1] in HF_LAYER_LISTS and kind.__name__.endswith("Layer")):
            yield name, module


def compile_roots(objective) -> dict[str, nn.Module]:
    """The modules whose blocks run in a training step: the student, and an EMA teacher when there is one."""
    roots = {"student": objective.student}
    distill = getattr(objective, "distill", None)
    if distill is not None:
        roots["teacher"] = distill.teacher
    return roots


def check_backend(device_type: str) -> None:
    """Fail early, in one line, when inductor cannot build kernels for this device."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"model.compile=true on CUDA needs Triton (inductor's GPU backend): {e}; "
                               "pip install triton, or set model.compile=false") from None
        return
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise RuntimeError("model.compile=true on CPU needs a C++ compiler for inductor's C++ backend (none of g++, "
                           "c++, clang++ or $CXX is on PATH): install one (apt-get install g++), or set "
                           "model.compile=false")


def compile_module_blocks(root: nn.Module, fullgraph: bool = True) -> list[str]:
    """Compile every block under `root` in place; returns "name (n x Class)" per block list.
    `fullgraph` applies to our `Block`s (Hugging Face layers are always compiled with fullgraph=False)."""
    done = []
    for name, blocks in block_lists(root):
        for block in blocks:
            ours = isinstance(block, Block)
            block.compile(fullgraph=ours and fullgraph, dynamic=False if ours else None)
        done.append(f"{name} ({len(blocks)} x {type(blocks[0]).__name__})")
    return done


def compile_objective(objective, device_type: str, zero3: bool = False) -> list[str]:
    """Compile the transformer blocks of the objective's student (and EMA teacher) in place, unconditionally;
    returns "root.name (n x Class)" per block list. `zero3`: the student will run under ZeRO-3 (fullgraph off)."""
    check_backend(device_type)
    # One cache per code object (Block.forward, HF's layer forward), shared by every block: one entry per shape,
    # grad mode and drop-path kind (DINO: 2 crop sizes x (Identity, DropPath) for the student + the teacher's 2,
    # the hybrid's text tower one more). torch's default cap of 8 is near that; a cap, not a cost.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    # ZeRO-3 gathers each submodule's parameters in forward hooks that DeepSpeed marks torch.compiler.disable: every
    # block's graph breaks there (correct, in pieces). fullgraph=True would refuse that, so it is off under ZeRO-3.
    done = [f"{root_name}.{entry}" for root_name, root in compile_roots(objective).items()
            for entry in compile_module_blocks(root, fullgraph=not zero3)]
    if not done:
        raise RuntimeError(f"model.compile=true but the {objective.name} objective has no transformer blocks to "
                           "compile (models/transformer.Block or Hugging Face *Layer lists)")
    return done


def compile_blocks(objective, device_type: str | None = None) -> list[str]:
    """`model.compile=true`: `compile_objective` for the trainer; a no-op returning [] when model.compile is off.

    Call it after `configure_grad_checkpointing` and before `deepspeed.initialize` (the engine then wraps a student
    whose blocks are already compiled)."""
    if not compile_enabled(objective.cfg):
        return []
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    zero3 = getattr(getattr(objective.cfg, "deepspeed", None), "zero_stage", 0) == 3
    done = compile_objective(objective, device_type, zero3)
    if int(os.environ.get("RANK", "0")) == 0:
        note = (" (ZeRO-3: fullgraph off, each block's graph breaks at DeepSpeed's parameter-gather hooks)"
                if zero3 else "")
        print(f"[clipdino] model.compile: torch.compile per block: {'; '.join(done)}{note}", flush=True)
    return done

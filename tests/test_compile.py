"""`model.compile=true` (train/compile.py) on the CPU, through inductor's C++ backend: compiled and eager training
agree (losses per step, gradients), with gradient checkpointing, under the DeepSpeed engine, with loss.impl=triton,
and checkpoints of either kind resume the other exactly. Tiny models at 32 px: the cost is compile time."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import tiny_overrides
from train.config_loader import load_config
from train.plots import read_jsonl

TOL = 1e-5  # per-step loss agreement, compiled vs eager (inductor reorders reductions: ~1e-6 here)

if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
    pytest.skip("inductor's C++ backend needs a C++ compiler (g++ / c++ / clang++); none is on PATH",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def clean_state():
    """train() sets RANK, MASTER_PORT, ... (later launcher tests must not inherit them); Dynamo's caches are
    per code object and process-wide: every test starts and ends without compiled entries."""
    saved = dict(os.environ)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    os.environ.clear()
    os.environ.update(saved)


def config(world, run_dir, objective: str, *extra: str):
    return load_config(f"launch/configs/pretrain/tiny_{objective}.yaml",
                       tiny_overrides(world, run_dir, "data.workers=1", "checkpoint.export=false",
                                      "model.vision.drop_path=0", *extra))  # drop path: inductor's RNG is not eager's


def run(world, run_dir, objective: str, *extra: str) -> dict[int, float]:
    from train.trainer import train

    train(config(world, run_dir, objective, *extra))
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (got, want)
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst <= TOL, f"compiled vs eager losses differ by {worst:.2e}\n{got}\n{want}"


def build(cfg):
    from train.objectives.registry import build_objective

    torch.manual_seed(cfg.seed)
    return build_objective(cfg, steps_per_epoch=20, total_steps=100)


def test_blocks_compiled_in_place_keys_unchanged(tiny_world, tmp_path):
    """What is compiled (towers and teacher, not the DINO head), and nothing is renamed: no `_orig_mod.` keys."""
    from train.compile import compile_blocks

    for objective, expected in (("clip", ["student.visual.blocks (4 x Block)", "student.text.blocks (1 x Block)"]),
                                ("dino", ["student.backbone.blocks (4 x Block)",
                                          "teacher.backbone.blocks (4 x Block)"])):
        eager = build(config(tiny_world, tmp_path, objective))
        compiled = build(config(tiny_world, tmp_path, objective, "model.compile=true"))
        assert compile_blocks(eager, "cpu") == []  # model.compile=false: a no-op
        assert compile_blocks(compiled, "cpu") == expected
        assert list(compiled.student.state_dict()) == list(eager.student.state_dict())
        assert all("_orig_mod" not in k for k in compiled.student.state_dict())
        assert list(compiled.state_dict().get("teacher", {})) == list(eager.state_dict().get("teacher", {}))
        for name, module in compiled.student.named_modules():
            is_block = name.rsplit(".", 1)[-1].isdigit() and ".blocks." in f".{name}"
            assert (getattr(module, "_compiled_call_impl", None) is not None) == is_block, name


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_loss_and_gradients_match_eager(grad_checkpointing, tiny_world, tmp_path):
    """One CLIP forward + backward on the same batch: the loss and every parameter's gradient agree."""
    from data.loader import Batch
    from train.compile import compile_blocks

    overrides = [f"model.vision.grad_checkpointing={str(grad_checkpointing).lower()}"]
    eager = build(config(tiny_world, tmp_path, "clip", *overrides))
    compiled = build(config(tiny_world, tmp_path, "clip", "model.compile=true", *overrides))
    compiled.student.load_state_dict(eager.student.state_dict())
    for objective in (eager, compiled):
        objective.configure_grad_checkpointing()
    compile_blocks(compiled, "cpu")
    gen = torch.Generator().manual_seed(0)
    text = compiled.student.text
    tokens = torch.randint(4, text.cfg.vocab_size - 1, (8, text.cfg.context_length), generator=gen)
    tokens[:, 10] = text.cfg.vocab_size - 1 if text.cfg.eot_id is None else text.cfg.eot_id  # pooled there
    batch = Batch(keys=[str(i) for i in range(8)], images=torch.randn(8, 3, 32, 32, generator=gen), tokens=tokens)
    grads, losses = [], []
    for objective in (eager, compiled):
        student = objective.student.train()
        loss = objective.compute_loss(student, batch, step=0)["loss"]
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) <= TOL, losses
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        want, got = grads[0][name], grads[1][name]
        scale = want.abs().max().item() + 1e-12
        assert (got - want).abs().max().item() <= 1e-4 * scale + 1e-6, name
    block = "visual.blocks.0.attn.qkv.weight"  # the reported figure: a gradient inside a compiled block
    print(f"loss |d| {abs(losses[0] - losses[1]):.2e}; {block} grad max |d| "
          f"{(grads[1][block] - grads[0][block]).abs().max().item():.2e}")


def fused_loss() -> str:
    """loss.impl=triton (the fused kernels, in Triton's interpreter on CPU) when triton is installed."""
    from kernels.triton_runtime import triton_installed, use_interpreter

    if not triton_installed():
        return "loss.impl=torch"
    use_interpreter()  # conftest set TRITON_INTERPRET=1 before triton was imported; the fixture restores the env
    return "loss.impl=triton"


def test_trainer_parity_and_cross_resume(tiny_world, tmp_path):
    """Through the trainer and its DeepSpeed engine (ZeRO-1), with loss.impl=triton (outside the compiled blocks):
    4 steps eager vs compiled agree per step; the compiled run (with gradient checkpointing) resumes the eager run's
    step-2 checkpoint, and the eager run the compiled one's, and both give the straight runs' steps 3 and 4."""
    from kernels.triton_runtime import LAUNCHES

    common = ["schedule.steps=4", "checkpoint.every=2", fused_loss()]
    eager = run(tiny_world, tmp_path / "eager", "clip", *common)
    launches = LAUNCHES["pairwise_forward"]
    compiled = run(tiny_world, tmp_path / "compiled", "clip", "model.compile=true", *common)
    assert_close(compiled, eager)
    if common[-1] == "loss.impl=triton":
        assert LAUNCHES["pairwise_forward"] > launches  # the fused kernel ran beside the compiled blocks
    from_eager = run(tiny_world, tmp_path / "compiled_from_eager", "clip", "model.compile=true",
                     "model.vision.grad_checkpointing=true", *common,
                     f"resume={tmp_path / 'eager' / 'checkpoints' / 'step_0000002'}")
    assert_close(from_eager, {s: eager[s] for s in (3, 4)})
    from_compiled = run(tiny_world, tmp_path / "eager_from_compiled", "clip", *common,
                        f"resume={tmp_path / 'compiled' / 'checkpoints' / 'step_0000002'}")
    assert_close(from_compiled, {s: compiled[s] for s in (3, 4)})


@pytest.mark.slow  # ~80 s on 2 cores with a cold inductor cache
def test_dino_with_fused_loss_and_checkpointing(tiny_world, tmp_path):
    """DINO (two crop sizes, EMA teacher compiled too) with the fused loss kernels and gradient checkpointing:
    compiled = eager per step."""
    common = ["schedule.steps=3", "checkpoint.every=0", fused_loss(), "model.vision.grad_checkpointing=true"]
    eager = run(tiny_world, tmp_path / "eager", "dino", *common)
    compiled = run(tiny_world, tmp_path / "compiled", "dino", "model.compile=true", *common)
    assert_close(compiled, eager)


def test_drop_path_compiles_once_for_every_rate():
    """The rate is a tensor under compile: blocks with different rates share one graph, and the masks keep the
    distribution (each sample kept with probability 1 - p, scaled by 1 / (1 - p))."""
    from torch._dynamo.utils import counters

    from models.transformer import DropPath

    x = torch.ones(4000, 2, 3)
    seen = counters["stats"]["unique_graphs"]
    modules = [DropPath(p).train() for p in (0.25, 0.5)]
    for p, module in zip((0.25, 0.5), modules):
        module.compile(fullgraph=True, dynamic=False)
        assert module.state_dict() == {}
        out = module(x)
        kept = out[:, 0, 0] != 0
        assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
        assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
        assert abs(kept.float().mean().item() - (1 - p)) < 0.05
    assert counters["stats"]["unique_graphs"] - seen == 1  # both rates, one graph
    assert torch.equal(modules[0].eval()(x), x)


@pytest.mark.slow  # a tiny Llava twice (~40 s)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_vlm_compiled_matches_eager(zero_stage, tmp_path):
    """The VLM stage's switch: the LLM's decoder layers and the vision tower's layers compiled (Hugging Face
    classes, fullgraph off), with gradient checkpointing, under ZeRO-2 and ZeRO-3 (one rank)."""
    from train.trainer import train
    from train.vlm_config import VLM_CHOICES, VLMConfig
    from vlm_fixtures import make_encoder_export, make_llava_data

    encoder = make_encoder_export(tmp_path / "encoder")
    data = make_llava_data(tmp_path / "data", records=16, text_only=4)
    losses = {}
    for compiled in ("false", "true"):
        run_dir = tmp_path / f"run_{compiled}"
        cfg = load_config("launch/configs/vlm/tiny_stage2.yaml",
                          ["logging.progress=false", "logging.wandb=disabled", "data.generate_synthetic=false",
                           "data.workers=1", "schedule.global_batch=8", "model.llm=tiny-llama", "model.projector_from=",
                           f"model.vision={encoder}", f"data.train={data['stage2']}", f"run.dir={run_dir}",
                           "schedule.steps=2", "checkpoint.every=0", "checkpoint.export=false",
                           "model.grad_checkpointing=true", f"deepspeed.zero_stage={zero_stage}",
                           f"model.compile={compiled}"], VLMConfig, VLM_CHOICES)
        train(cfg)
        losses[compiled] = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    assert_close(losses["true"], losses["false"])

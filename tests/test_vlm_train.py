"""The VLM stage end to end through launch/train_vlm.py: stage 1 -> stage 2 on 2 DeepSpeed CPU ranks with ZeRO-3,
exact resume, and the export loaded by stock transformers in a process that imports no clipdino module."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_train_e2e import free_port, losses
from vlm_fixtures import make_encoder_export, make_llava_data

pytestmark = pytest.mark.distributed
CONFIGS = REPO / "launch" / "configs" / "vlm"
QUIET = ["logging.progress=false", "logging.wandb=disabled", "data.generate_synthetic=false", "data.workers=1",
         "schedule.global_batch=8", "model.llm=tiny-llama"]


@pytest.fixture(scope="module")
def vlm_inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm")
    return {"encoder": make_encoder_export(out / "encoder"), **make_llava_data(out / "data", records=32, text_only=8)}


def train_vlm(stage: int, overrides: list[str], ranks: int = 1, expect_ok: bool = True):
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    script = [str(REPO / "launch" / "train_vlm.py"), "--config", str(CONFIGS / f"tiny_stage{stage}.yaml"), *QUIET,
              *overrides]
    port = free_port()
    cmd = ([sys.executable, *script] if ranks == 1 else
           [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
            *script])
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return out


def _parts(export: Path) -> dict[str, dict[str, torch.Tensor]]:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(export)
    return {part: getattr(model.model, part).state_dict()
            for part in ("vision_tower", "multi_modal_projector", "language_model")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stage1_run(vlm_inputs, tmp_path_factory):
    """Stage 1 with eval.watch=true: the watcher scores the export on a tiny VMCBench beside the training."""
    from eval.vmcbench.tiny import tiny_rows, write_tiny_vmcbench

    run = tmp_path_factory.mktemp("stage1")
    bench = write_tiny_vmcbench(run.parent / f"{run.name}_vmcbench", tiny_rows(["TextVQA", "AI2D", "synthetic_shape"]))
    train_vlm(1, [f"model.vision={vlm_inputs['encoder']}", f"data.train={vlm_inputs['stage1']}", f"run.dir={run}",
                  "schedule.steps=3", "eval.watch=true", f"eval.data={bench}", "eval.max_new_tokens=2"])
    return run


def test_stage1_then_stage2_zero3_on_two_ranks(vlm_inputs, stage1_run, tmp_path):
    s1_export = stage1_run / "export" / "step_0000003"
    rows = [json.loads(line) for line in (stage1_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["tokens_per_s"] > 0 and r["count/tokens"] > 0 for r in rows)
    assert (stage1_run / "loss.png").is_file() and (stage1_run / "config.yaml").is_file()
    ledger_file = stage1_run / "evals.jsonl"
    deadline = time.time() + 180  # the watcher finishes the last export after the training exits (not waited for)
    while not ledger_file.exists() and time.time() < deadline:
        time.sleep(1)
    ledger = [json.loads(line) for line in ledger_file.read_text().splitlines()]
    assert [(r["step"], r["status"]) for r in ledger] == [(3, "ok")], ledger
    assert json.loads((stage1_run / "evals" / "step_0000003" / "results.json").read_text())["n"] == 3
    run = tmp_path / "stage2"
    train_vlm(2, [f"model.vision={vlm_inputs['encoder']}", f"data.train={vlm_inputs['stage2']}", f"run.dir={run}",
                  f"model.projector_from={stage1_run}", "data.template=vicuna_v1", "schedule.steps=3",
                  "deepspeed.zero_stage=3"], ranks=2)
    s2_export = run / "export" / "step_0000003"
    meta = json.loads((s2_export / "clipdino_vlm.json").read_text())
    assert meta["projector_from"] == str(s1_export) and meta["template"] == "vicuna_v1"
    s1, s2 = _parts(s1_export), _parts(s2_export)
    # the tower is frozen in both stages (ZeRO-3 partitions it and gathers it whole at export)
    assert _equal(s1["vision_tower"], s2["vision_tower"]) and s1["vision_tower"]
    # stage 1 trained only the projector; stage 2 moved the LLM and the projector on from stage 1's
    from models.vlm import build_llava

    fresh, _ = build_llava(str(vlm_inputs["encoder"]), "tiny-llama", template="vicuna_v1")
    fresh_llm = fresh.model.language_model.state_dict()
    assert _equal(s1["language_model"], fresh_llm)
    assert not _equal(s2["language_model"], fresh_llm)
    assert not _equal(s1["multi_modal_projector"], s2["multi_modal_projector"])
    assert all(torch.isfinite(torch.tensor(r)) for r in losses(run).values())


def test_stage2_resume_is_bitwise_on_two_ranks_with_zero3(vlm_inputs, stage1_run, tmp_path):
    """4 steps straight vs 2, stop, resume=auto, 2 more: identical per-step losses (fp32 CPU, ZeRO-3, 2 ranks)."""
    common = [f"model.vision={vlm_inputs['encoder']}", f"data.train={vlm_inputs['stage2']}",
              f"model.projector_from={stage1_run}", "schedule.steps=4", "checkpoint.every=2", "data.template=chatml",
              "deepspeed.zero_stage=3",
              "model.llm=tiny-qwen2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_vlm(2, [*common, f"run.dir={straight}"], ranks=2)
    train_vlm(2, [*common, f"run.dir={split}", "schedule.stop_after=2"], ranks=2)
    assert sorted(losses(split)) == [1, 2]
    train_vlm(2, [*common, f"run.dir={split}", "resume=auto"], ranks=2)
    assert losses(split) == losses(straight) and len(losses(straight)) == 4
    a, b = (load_file(str(r / "export" / "step_0000004" / "model.safetensors")) for r in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_are_one_line(vlm_inputs, tmp_path):
    out = train_vlm(1, [f"model.vision={vlm_inputs['encoder']}", "model.projectr=linear"], expect_ok=False)
    assert out.returncode == 2 and "did you mean 'model.projector'" in out.stderr
    out = train_vlm(1, [f"data.train={vlm_inputs['stage1']}", f"run.dir={tmp_path}"], expect_ok=False)
    assert out.returncode == 1 and "set model.vision" in out.stderr and "Traceback" not in out.stderr

"""launch/reproduce.py end to end on a setting smaller than the tiny preset (a few steps per stage): every stage,
a kill during pretraining then a rerun that continues from the checkpoint, a failing variant that does not stop
the others, the report, and a rerun that skips what is done."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_OVERRIDES
from train.checkpoint import MARKER

pytestmark = pytest.mark.distributed  # subprocesses (one rank each)
EVAL_FAST = ["--probe-epochs", "4", "--probe-grid-epochs", "1", "--pairs-per-factor", "4", "--factor-probe-epochs",
             "2", "--workers", "0", "--no-cache", "--max-pair-images", "32"]


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory):
    from data.vlm_synthetic import ensure_vlm_data

    out = tmp_path_factory.mktemp("vlm_data")
    return ensure_vlm_data(out, seed=0, stage1_samples=16, stage2_samples=16, image_size=32, val_questions=14,
                           test_questions=7, shards=False)


def write_preset(path: Path, world: Path, vlm: dict) -> Path:
    pretrain = [o for o in TINY_OVERRIDES if not o.startswith("checkpoint.keep")] + [
        f"data.train={world}/train-{{000000..000015}}.tar", f"data.tokenizer={world}/tokenizer.model",
        "schedule.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "data.synthetic_image_size=32"]
    vlm_common = ["model.llm=tiny-llama", "logging.wandb=disabled", "data.generate_synthetic=false",
                  "data.workers=1", "schedule.global_batch=4", "schedule.steps=2", "data.max_length=128"]
    preset = {
        "description": "test preset",
        "variants": ["clip", "dino"],
        "seeds": 1,
        "launcher": "python",
        "pretrain": {"config": "launch/configs/pretrain/tiny_{variant}.yaml", "overrides": pretrain,
                     "variant_overrides": {"siglip": ["schedule.no_such_key=1"]}},
        "eval": {"data": str(world), "tasks": "linear_probe,knn,embedding", "args": EVAL_FAST},
        "compare": {"pairs": [["clip", "dino"]], "tasks": "embedding", "args": EVAL_FAST},
        "vlm": {"seeds": 1, "stage1": "launch/configs/vlm/tiny_stage1.yaml",
                "stage2": "launch/configs/vlm/tiny_stage2.yaml",
                "overrides": vlm_common,
                "stage1_overrides": [f"data.train={vlm['stage1_json']}", f"data.image_folder={vlm['image_folder']}"],
                "stage2_overrides": [f"data.train={vlm['stage2_json']}", f"data.image_folder={vlm['image_folder']}"]},
        "vmcbench": {"data": str(vlm["vmcbench"]), "args": ["--batch-size", "7", "--max-new-tokens", "4"]},
        "estimates_s": {"pretrain": 10, "eval": 10, "compare": 10, "vlm_stage1": 10, "vlm_stage2": 10, "vmcbench": 5},
        "notes": "A test run: a few steps per stage.",
    }
    path.write_text(yaml.safe_dump(preset))
    return path


def reproduce(preset: Path, out: Path, *extra: str, background: bool = False):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(REPO / "launch" / "reproduce.py"), "--preset", str(preset), "--out", str(out),
           "--poll", "1", *extra]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_study_end_to_end_with_kill_resume_and_a_failing_variant(tiny_world, vlm_data, tmp_path):
    preset = write_preset(tmp_path / "preset.yaml", tiny_world, vlm_data)
    out = tmp_path / "study"
    # 1. killed (the whole process group, as a preempted job) once pretraining has written its first checkpoint
    proc = reproduce(preset, out, "--variants", "clip,dino,siglip", background=True)
    ckpts = out / "pretrain" / "clip_s0" / "checkpoints"
    deadline = time.time() + 300
    while not any(ckpts.glob(f"step_*/{MARKER}")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    record = json.loads((out / "pretrain" / "clip_s0" / "stage.json").read_text())
    assert record["status"] == "running", "the kill must land during the first stage"
    killed_at = max(int(p.parent.name.split("_")[1]) for p in ckpts.glob(f"step_*/{MARKER}"))

    # 2. the rerun continues that stage from its checkpoint, runs the rest; siglip fails, the others go on
    done = reproduce(preset, out, "--variants", "clip,dino,siglip")
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "pretrain/clip_s0: was running: continuing from step_" in text
    log = (out / "logs" / "pretrain" / "clip_s0.log").read_text()
    assert f"resumed from" in log and f"step_{killed_at:07d}" in log, log[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "pretrain" / "clip_s0" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(1, 7)), steps  # no step lost or repeated across the kill
    assert "pretrain/siglip_s0: FAILED (exit" in text and "no_such_key" in text
    assert "eval/siglip_s0: blocked by pretrain/siglip_s0" in text
    study = {s["name"]: s for s in json.loads((out / "study.json").read_text())["stages"]}
    for name in ("pretrain/clip_s0", "pretrain/dino_s0", "eval/clip_s0", "eval/dino_s0", "compare/clip_vs_dino_s0",
                 "vlm1/clip", "vlm2/clip", "vmcbench/clip", "vlm1/dino", "vlm2/dino", "vmcbench/dino"):
        assert study[name]["status"] == "done", (name, study[name], text[-3000:])
    assert study["pretrain/siglip_s0"]["status"] == "failed"
    assert study["vlm2/siglip"]["status"] == "blocked"

    report = (out / "report" / "report.md").read_text()
    for section in ("## Stages", "## Training", "## Encoder probes", "## Factor sensitivity", "## CLIP / DINO disagreement",
                    "## VMCBench", "## CLIP − DINO, ours beside the paper's", "## What differed between the pretraining",
                    "## What this run shows and what it cannot"):
        assert section in report, section
    assert "**failed**" in report and "### clip vs dino:" in report
    assert "Identical in every run: `model.vision.size`" in report
    for png in ("losses.png", "probes.png", "factor_probe.png", "factor_sensitivity.png", "vmcbench_groups.png", "deltas.png",
                "clip_vs_dino_s0_embedding_disagreement_pairs.png"):
        assert (out / "report" / png).stat().st_size > 1000, png
    vmc = json.loads((out / "vmcbench" / "clip" / "results.json").read_text())
    assert vmc["n"] == 14 and set(vmc["groups"]) == {"micro", "macro"}

    # 3. a rerun without the failing variant has nothing left to do
    again = reproduce(preset, out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("(skipped)") == 11 and "started" not in again.stdout


def test_bad_preset_and_variant_are_one_line_errors(tmp_path):
    for args, expected in ((["--preset", "nope"], "no preset 'nope'"),
                           (["--variants", "clip,dinov2"], "unknown variant(s) ['dinov2']"),
                           (["--set", "vlmm.seeds=1"], "unknown preset key 'vlmm' (did you mean 'vlm'?)")):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), *args, "--dry-run"],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_paper_preset_needs_its_paths_and_dry_run_prints_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATACOMP_DIR", "IMAGENET_SHARDS")}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), "--preset", "paper", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "export " in proc.stderr, proc.stderr
    dry = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), "--preset", "paper", "--dry-run",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "vitb16_clip_datacomp10m.yaml" in dry.stdout and "llava15_vicuna7b_stage2.yaml" in dry.stdout


def test_runner_knows_the_checkpoint_marker():
    sys.path.insert(0, str(REPO / "launch"))
    import study_runner

    assert study_runner.CHECKPOINT_MARKER == MARKER


def test_released_preset_converts_and_probes_local_encoders(tiny_world, tmp_path):
    """The released preset on stand-ins for the paper's checkpoints: a CLIPVisionModel and a ViTModel saved as
    local folders (no hub), converted by the existing converters, then probed (VLM stages off for the test)."""
    import torch
    import transformers

    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8))
    dino = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        layer_norm_eps=1e-6), add_pooling_layer=False)
    clip.save_pretrained(tmp_path / "clip_hf")
    dino.save_pretrained(tmp_path / "dino_hf")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RELEASED_CLIP": str(tmp_path / "clip_hf"),
           "RELEASED_DINO": str(tmp_path / "dino_hf"), "IMAGENET_SHARDS": str(tiny_world)}
    args = ["--set", "vlm=null", "--set", f"eval.args={json.dumps(EVAL_FAST)}", "--set", "compare.args=[--no-cache]"]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), "--preset", "released", "--out",
                           str(tmp_path / "study"), "--poll", "1", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = {s["name"]: s["status"] for s in json.loads((tmp_path / "study" / "study.json").read_text())["stages"]}
    assert study == {"source/clip": "done", "source/dino": "done", "eval/clip_s0": "done", "eval/dino_s0": "done",
                     "compare/clip_vs_dino_s0": "done"}
    for variant in ("clip", "dino"):
        config = json.loads((tmp_path / "study" / "source" / variant / "export" / "config.json").read_text())
        assert config["vision"]["width"] == 32
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "| clip | 1 |" in report and "| dino | 1 |" in report


def test_runner_skips_reruns_and_invalidates_dependents(tmp_path):
    """The runner alone, on stages that are one-line programs: skip what is done, rerun a changed stage from scratch
    and everything downstream of it, block what depends on a failure, run the rest."""
    sys.path.insert(0, str(REPO / "launch"))
    from study_plan import Stage
    from study_runner import StudyRunner

    def writer(name: str, text: str, fail: bool = False):
        code = f"import pathlib,sys; pathlib.Path({str(tmp_path / 'out' / name)!r}, 'f.txt').write_text({text!r})"
        return lambda out: [sys.executable, "-c", code + ("; sys.exit(3)" if fail else "")]

    def plan(a_text: str, c_fails: bool):
        return [Stage("a/x", "eval", "x", 0, [], writer("a/x", a_text)),
                Stage("b/x", "eval", "x", 0, ["a/x"], writer("b/x", "b")),
                Stage("c/y", "eval", "y", 0, [], writer("c/y", "c", fail=c_fails)),
                Stage("d/y", "eval", "y", 0, ["c/y"], writer("d/y", "d"))]

    def run(stages):
        for name in ("a/x", "b/x", "c/y", "d/y"):
            (tmp_path / "out" / name).mkdir(parents=True, exist_ok=True)
        lines = []
        status = StudyRunner(stages, tmp_path / "out", log=lines.append, poll_s=5).run()
        return status, "\n".join(lines)

    status, text = run(plan("a1", c_fails=True))
    assert status == {"a/x": "done", "b/x": "done", "c/y": "failed", "d/y": "blocked"}, text
    assert "c/y: FAILED (exit 3)" in text and "d/y: blocked by c/y" in text
    status, text = run(plan("a1", c_fails=False))
    assert status == {"a/x": "skipped", "b/x": "skipped", "c/y": "done", "d/y": "done"}, text
    status, text = run(plan("a2", c_fails=False))  # a's command changed: a and b again, c and d skipped
    assert status == {"a/x": "done", "b/x": "done", "c/y": "skipped", "d/y": "skipped"}, text
    assert "a/x: its command changed since it ran" in text and "b/x: its input a/x was made again: starting it over" in text
    assert (tmp_path / "out" / "a" / "x" / "f.txt").read_text() == "a2"

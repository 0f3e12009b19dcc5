"""launch/bench.py vlm: a tiny stage-2 step, ours vs plain transformers, end to end (tiny-llama, micro tower)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--llm", "tiny-llama", "--vision", "tiny", "--batch", "2", "--text-tokens", "16", "--steps", "2", "--warmup", "1"]


def run_bench(out: Path, extra: list[str]) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "launch/bench.py", "vlm", *TINY, *extra, "--json", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_report(report: dict) -> None:
    for side in ("ours", "plain"):
        r = report[side]
        assert len(r["step_times_s"]) == 2 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert len(r["losses"]) == 3  # 1 warm-up + 2 timed
    # same weights, same batch: the same loss and gradients, and the same losses step after step
    assert report["parity"]["loss_abs_diff"] < 1e-4 and report["parity"]["grad_max_rel_diff"] < 1e-4
    assert report["loss_trajectory_max_abs_diff"] < 1e-4
    assert report["ratio"] == report["ours"]["samples_per_s"] / report["plain"]["samples_per_s"]
    c = report["counts"]  # 2 samples x 64 image tokens + 16 and 12 text tokens; the padding is not counted
    assert report["image_tokens"] == 64 and c["count/input_tokens"] == 2 * 64 + 16 + 12 and c["count/samples"] == 2
    assert report["flops_per_step"] > 0 and report["loadavg_start"] and report["versions"]["transformers"]


def test_bench_vlm_tiny(tmp_path: Path) -> None:
    report, stdout = run_bench(tmp_path / "vlm.json", [])
    check_report(report)
    assert report["engine"] == "torch" and "ratio ours / plain" in stdout and "| samples/s |" in stdout


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_bench_vlm_tiny_zero3(tmp_path: Path) -> None:
    report, _ = run_bench(tmp_path / "vlm_zero3.json", ["--engine", "deepspeed", "--zero-stage", "3"])
    check_report(report)
    assert report["engine"] == "deepspeed" and report["zero_stage"] == 3 and report["versions"]["deepspeed"]

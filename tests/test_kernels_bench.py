"""launch/bench.py loss: tiny sweeps (one child process per batch size), the JSON figures and the memory plot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.triton_runtime import triton_installed

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "launch/bench.py", "loss", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_loss_bench_measures_both_paths_and_plots(tmp_path: Path) -> None:
    fused, naive, png = tmp_path / "fused.json", tmp_path / "naive.json", tmp_path / "memory.png"
    out = bench("--loss", "clip", "--impl", "triton", "--batch", "32", "64", "--dim", "32",
                "--tiles", "16", "16", "32", "32", "--json", str(fused)).stdout
    assert "NOT a performance figure" in out  # the child set TRITON_INTERPRET=1 itself
    report = json.loads(fused.read_text())
    assert [r["batch"] for r in report["results"]] == [32, 64]
    for r in report["results"]:
        assert r["backend"] == "interpreter" and r["peak_alloc_bytes"] > 0 and len(r["time_s"]) == 1
        assert r["held_after_forward_bytes"] < r["peak_alloc_bytes"]
    # the fused path's memory: input gradients (4 x B x D fp32 at most) + O(B) statistics
    assert report["results"][1]["peak_alloc_bytes"] <= 5 * 64 * 32 * 4 + 4096
    bench("--loss", "dino", "--impl", "torch", "--batch", "4", "8", "--k", "256", "--local-crops", "2",
          "--json", str(naive))
    report = json.loads(naive.read_text())
    assert report["dino"] == {"k": 256, "global_crops": 2, "local_crops": 2}
    assert all(r["backend"] == "torch" and r["peak_alloc_bytes"] > 0 for r in report["results"])
    assert 0.8 < report["peak_alloc_fit"]["exponent"] < 1.2  # linear in the batch
    bench("--plot", str(png), "--from", str(fused), str(naive))
    assert png.stat().st_size > 1000

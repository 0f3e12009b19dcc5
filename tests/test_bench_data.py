"""launch/bench.py data: tiny runs of both backends write the figures; a machine without DALI gets one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--samples", "24", "--source-size", "48", "--image-size", "32", "--local-size", "16", "--local-crops", "2",
        "--batch", "4", "--batches", "2", "--warmup", "1"]


def run_bench(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run([sys.executable, "launch/bench.py", "data", *TINY, "--cache", str(tmp_path / "cache"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend,task", [("cpu", "dino"), ("dali", "dino"), ("dali", "clip")])
def test_bench_writes_figures(backend, task, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "bench.json"
    proc = run_bench(["--backend", backend, "--task", task, "--threads", "2", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["images_per_s"] > 0 and report["threads"] == 2 and report["images"] == 8
    assert report["images_per_s_per_thread"] == pytest.approx(report["images_per_s"] / 2)
    assert report["backend"] == backend and report["task"] == task and len(report["loadavg_start"]) == 3
    assert report["crops"] == ([2, 32, 2, 16] if task == "dino" else None)
    assert "images/s" in proc.stdout and "per thread" in proc.stdout


def test_bench_without_dali_says_how_to_install(tmp_path):
    blocker = tmp_path / "blocker" / "nvidia"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("")  # a regular package named nvidia hides nvidia.dali
    proc = run_bench(["--backend", "dali", "--task", "dino"], tmp_path,
                     {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(REPO)])})
    assert proc.returncode == 2 and "pip install nvidia-dali-cuda130" in proc.stderr and "Traceback" not in proc.stderr

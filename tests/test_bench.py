"""launch/bench.py train: tiny end-to-end runs (ours vs open_clip, DINO, and a machine without deepspeed/open_clip)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MICRO = ["--model", "vit_micro", "--batch", "8", "--steps", "2", "--warmup", "1"]


def run_bench(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(extra_env or {})}
    return subprocess.run([sys.executable, "launch/bench.py", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def read_report(proc: subprocess.CompletedProcess, path: Path) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(path.read_text())


def check_common(report: dict) -> None:
    for key in ("samples_per_s", "mfu", "peak_mem_bytes", "flops_per_sample", "peak_flops"):
        assert report[key] > 0, key
    for key in ("device", "torch_version", "model", "objective", "batch", "precision", "steps", "peak_flops_source",
                "started_at", "finished_at", "command"):
        assert report[key] not in (None, ""), key
    assert report["precision"] == "fp32" and report["device"] == "cpu" and report["batch"] == 8
    assert len(report["step_times_s"]) == 2


def test_clip_vs_open_clip(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    out = tmp_path / "clip.json"
    proc = run_bench([*MICRO, "--objective", "clip", "--vs", "open_clip", "--json", str(out)])
    report = read_report(proc, out)
    check_common(report)
    assert report["ref_samples_per_s"] > 0 and report["ratio"] > 0
    assert report["ratio"] == pytest.approx(report["samples_per_s"] / report["ref_samples_per_s"])
    assert report["ref_result"]["params"] > 0
    assert "ratio ours / open_clip" in proc.stdout


def test_dino_without_reference(tmp_path: Path) -> None:
    out = tmp_path / "dino.json"
    report = read_report(run_bench([*MICRO, "--objective", "dino", "--local-crops", "2", "--json", str(out)]), out)
    check_common(report)
    assert report["objective"] == "dino" and report["ref_samples_per_s"] is None and report["ratio"] is None
    assert report["dino_crops"] == [2, 64, 2, 24]  # 96 px at 224 scaled to 64 px, rounded to the patch (8)


def test_engine_both_and_compile(tmp_path: Path) -> None:
    """--engine both --compile: our step outside and inside the trainer's DeepSpeed engine, eager and compiled."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "engines.json"
    proc = run_bench([*MICRO, "--objective", "clip", "--engine", "both", "--compile", "model.text.layers=1",
                      "--json", str(out)])
    report = read_report(proc, out)
    check_common(report)
    names = ["ours", "ours+compile", "ours[ds-z1]", "ours[ds-z1]+compile"]
    assert list(report["sides"]) == names and report["side"] == "ours"
    assert report["engine"] == "both" and report["compile"] is True and report["zero_stage"] == 1
    for name in names:
        side = report["sides"][name]
        assert side["samples_per_s"] > 0 and len(side["step_times_s"]) == 2 and side["first_step_s"] > 0
    ratios = report["ratios"]
    assert set(ratios) == {"ours+compile / ours", "ours[ds-z1]+compile / ours[ds-z1]", "ours[ds-z1] / ours",
                           "ours[ds-z1]+compile / ours+compile"}
    assert ratios["ours[ds-z1] / ours"] == pytest.approx(report["sides"]["ours[ds-z1]"]["samples_per_s"]
                                                         / report["sides"]["ours"]["samples_per_s"])
    assert "ratio ours+compile / ours" in proc.stdout and "model.compile: " not in proc.stdout


def test_dino_through_the_deepspeed_engine(tmp_path: Path) -> None:
    """--engine deepspeed alone: the first (and only) side is the engine's; DINO's teacher and held groups run."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "dino_ds.json"
    report = read_report(run_bench([*MICRO, "--objective", "dino", "--local-crops", "2", "--engine", "deepspeed",
                                    "deepspeed.zero_stage=0", "--json", str(out)]), out)
    check_common(report)
    assert list(report["sides"]) == ["ours[ds-z0]"] and report["side"] == "ours[ds-z0]" and report["ratios"] == {}


@pytest.mark.slow  # open_clip's whole-model compile: minutes on 2 cores
def test_compile_vs_open_clip(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    out = tmp_path / "compile_vs.json"
    proc = run_bench([*MICRO, "--objective", "clip", "--compile", "--vs", "open_clip", "--json", str(out)])
    report = read_report(proc, out)
    assert list(report["sides"]) == ["ours", "ours+compile", "open_clip", "open_clip+compile"]
    assert {"ours+compile / ours", "open_clip+compile / open_clip", "ours / open_clip",
            "ours+compile / open_clip+compile"} <= set(report["ratios"])
    assert report["ratio"] == pytest.approx(report["ratios"]["ours / open_clip"])


def load_bench_module():
    if str(REPO / "launch") not in sys.path:
        sys.path.insert(0, str(REPO / "launch"))  # for its `import _bootstrap`
    spec = importlib.util.spec_from_file_location("clipdino_launch_bench", REPO / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dino_rejects_open_clip_reference(capsys: pytest.CaptureFixture) -> None:
    bench = load_bench_module()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["train", *MICRO, "--objective", "dino", "--vs", "open_clip"])
    assert exit_info.value.code == 2 and "not available for objective dino" in capsys.readouterr().err


def test_runs_without_deepspeed_and_skips_missing_open_clip(tmp_path: Path) -> None:
    """The GPU machine has neither package: the bench must not import deepspeed and must skip --vs cleanly."""
    blockers = tmp_path / "blockers"
    blockers.mkdir()
    for name in ("deepspeed", "open_clip"):
        (blockers / f"{name}.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    out = tmp_path / "skip.json"
    path = os.pathsep.join([str(blockers), os.environ.get("PYTHONPATH", "")])
    proc = run_bench([*MICRO, "--objective", "siglip", "--vs", "open_clip", "--json", str(out)], {"PYTHONPATH": path})
    report = read_report(proc, out)
    assert report["samples_per_s"] > 0 and report["ref_samples_per_s"] is None
    assert "open_clip is not importable" in report["ref_skipped"] and "skipped" in proc.stderr

"""The eval watcher: partial exports ignored, each export evaluated once, a failing eval isolated, trainer hook."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from eval.watcher import LEDGER, Watcher, WatcherBusy, _lock, complete_exports, read_ledger
from models.export import save_export
from models.vit import ViTConfig, VisionTransformer

ARGS = ["--workers", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def good_export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(size="micro", patch_size=8, image_size=32))
    return save_export(tmp_path_factory.mktemp("src") / "export", vit, "vit", {"vision": asdict(vit.cfg)},
                       meta={"objective": "dino"})


def add_export(run_dir: Path, step: int, source: Path) -> Path:
    dest = run_dir / "export" / f"step_{step:07d}"
    shutil.copytree(source, dest)
    return dest


def test_only_complete_exports_count(good_export, tmp_path):
    add_export(tmp_path, 1, good_export)
    tmp = tmp_path / "export" / ".step_0000002.tmp-abc123"  # the trainer's temp folder before its rename
    shutil.copytree(good_export, tmp)
    only_config = tmp_path / "export" / "step_0000003"
    only_config.mkdir()
    shutil.copy(good_export / "config.json", only_config)
    truncated = add_export(tmp_path, 4, good_export)  # a copy still in progress
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "export" / "step_0000005").write_text("a file, not a folder")
    assert [s for s, _ in complete_exports(tmp_path)] == [1]
    (truncated / "model.safetensors").write_bytes(data)  # the copy finishes
    assert [s for s, _ in complete_exports(tmp_path)] == [1, 4]


def test_each_export_once_and_failures_isolated(good_export, tiny_world, tmp_path):
    run = tmp_path / "run"
    add_export(run, 10, good_export)
    bad = add_export(run, 20, good_export)  # complete on disk, but its weights do not fit its config
    config = json.loads((bad / "config.json").read_text())
    config["vision"]["depth"] = 6
    (bad / "config.json").write_text(json.dumps(config))
    watcher = Watcher(run, "knn", str(tiny_world), interval=0.1, eval_args=ARGS)
    assert watcher.run(once=True) == 2
    rows = {r["export"]: r for r in read_ledger(run)}
    assert rows["step_0000010"]["status"] == "ok" and "knn/top1" in rows["step_0000010"]["summary"]
    assert rows["step_0000020"]["status"] == "failed" and "layout mismatch" in rows["step_0000020"]["error"]
    assert (run / "evals" / "step_0000010" / "results.json").is_file()
    assert (run / "evals" / "step_0000020" / "eval.log").is_file()
    md = (run / "evals.md").read_text()
    assert "| 10 | ok |" in md and "## Failures" in md and "step 20" in md

    assert watcher.run(once=True) == 0  # nothing new: nothing evaluated again
    add_export(run, 30, good_export)
    assert Watcher(run, "knn", str(tiny_world), eval_args=ARGS).run(once=True) == 1  # a new watcher: only step 30
    steps = [r["step"] for r in read_ledger(run)]
    assert sorted(steps) == [10, 20, 30] and len(steps) == 3
    assert (run / "evals.png").stat().st_size > 1000
    (run / LEDGER).write_text((run / LEDGER).read_text() + '{"step": 40, "export": "step_00')  # a torn last line
    assert len(read_ledger(run)) == 3

    retry = Watcher(run, "knn", str(tiny_world), interval=0.1, eval_args=ARGS, retry_failed=True)
    assert retry.run_once() == 1 and retry.run_once() == 0  # the failed export again, once per watcher
    assert [r["step"] for r in read_ledger(run)].count(20) == 2


def test_relative_paths_from_another_directory(good_export, tiny_world, tmp_path, monkeypatch):
    add_export(tmp_path / "run", 10, good_export)
    monkeypatch.chdir(tmp_path)  # the evaluation processes must find the run and the data from here too
    data = Path(os.path.relpath(tiny_world, tmp_path))
    assert Watcher("run", "knn", str(data), eval_args=ARGS).run(once=True) == 1
    assert [r["status"] for r in read_ledger(tmp_path / "run")] == ["ok"]


def test_ctrl_c_lets_the_running_evaluation_finish(good_export, tiny_world, tmp_path):
    add_export(tmp_path, 10, good_export)
    add_export(tmp_path, 20, good_export)
    cmd = [sys.executable, str(REPO / "launch" / "watch_evals.py"), str(tmp_path), "--once", "--tasks", "knn",
           "--data", str(tiny_world), "--", *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = tmp_path / "evals" / "step_0000010" / "eval.log"
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the terminal's whole foreground process group
    assert proc.wait(timeout=300) == 0
    rows = read_ledger(tmp_path)
    assert [(r["step"], r["status"]) for r in rows] == [(10, "ok")]  # finished and recorded; step 20 left for later

    started = tmp_path / "evals" / "step_0000020" / "eval.log"  # a second Ctrl-C ends the evaluation itself
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert [r["step"] for r in read_ledger(tmp_path)] == [10]  # no row: step 20 is evaluated next time


def test_export_format_matches_the_exporter():
    from eval.watcher import EXPORT_FORMAT
    from models.export import FORMAT

    assert EXPORT_FORMAT == FORMAT


def test_one_watcher_per_run(tmp_path):
    with _lock(tmp_path):
        with pytest.raises(WatcherBusy, match="another watcher"):
            with _lock(tmp_path):
                pass
    with _lock(tmp_path):  # released
        pass


def test_cli_once_and_errors(good_export, tiny_world, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, str(REPO / "launch" / "watch_evals.py"), *args], capture_output=True,
                              text=True, timeout=300)

    empty = cli(str(tmp_path), "--once", "--data", str(tiny_world))
    assert empty.returncode == 2 and "no complete exports" in empty.stderr and "Traceback" not in empty.stderr
    typo = cli(str(tmp_path), "--tasks", "linear_prob", "--data", str(tiny_world))
    assert typo.returncode == 2 and "did you mean linear_probe" in typo.stderr
    no_data = cli(str(tmp_path), "--once")  # no --data and no run config to take it from
    assert no_data.returncode == 2 and "set eval.data" in no_data.stderr
    (tmp_path / "config.yaml").write_text("eval: 5\n")  # a run config that is not what the trainer writes
    bad_config = cli(str(tmp_path), "--once")
    assert bad_config.returncode == 2 and "`eval` is not a section" in bad_config.stderr
    (tmp_path / "config.yaml").write_text("eval: [unclosed\n")
    bad_yaml = cli(str(tmp_path), "--once")
    assert bad_yaml.returncode == 2 and "invalid YAML" in bad_yaml.stderr and "Traceback" not in bad_yaml.stderr
    (tmp_path / "config.yaml").unlink()
    add_export(tmp_path, 7, good_export)
    ok = cli(str(tmp_path), "--once", "--tasks", "knn", "--data", str(tiny_world), "--", *ARGS)
    assert ok.returncode == 0, ok.stderr
    assert [r["status"] for r in read_ledger(tmp_path)] == ["ok"]


def test_trainer_starts_the_watcher(tiny_world, tmp_path):
    """eval.watch=true: each export of a 2-step run is evaluated by the watcher process, the final one too."""
    run = tmp_path / "run"
    env = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config",
           str(REPO / "launch" / "configs" / "pretrain" / "tiny_dino.yaml"),
           *tiny_overrides(tiny_world, run, "schedule.steps=2", "checkpoint.every=1", "eval.watch=true",
                           "eval.tasks=knn")]
    out = subprocess.run(cmd, cwd=REPO, env={**__import__("os").environ, **env}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval watcher started" in out.stdout + out.stderr
    deadline = time.time() + 240
    while time.time() < deadline and len(read_ledger(run)) < 2:
        time.sleep(1)
    rows = read_ledger(run)
    assert sorted(r["step"] for r in rows) == [1, 2] and all(r["status"] == "ok" for r in rows), rows
    assert (run / "evals.md").is_file()


# ----------------------------------------------------------------------------- VLM runs: VMCBench per export
def test_vlm_run_is_scored_on_vmcbench(tmp_path):
    from eval.vmcbench.tiny import tiny_rows, write_tiny_llava, write_tiny_vmcbench
    from eval.watcher import VLM

    data = write_tiny_vmcbench(tmp_path / "VMCBench", tiny_rows(["MMMU", "TextVQA", "AI2D", "SEEDBench"]))
    run = tmp_path / "run"
    export = write_tiny_llava(run / "export" / "step_0000005")
    (run / "config.yaml").write_text(f"model:\n  llm: tiny-qwen2\neval:\n  watch: true\n  data: {data}\n"
                                     "  split: dev\n  limit: 3\n  max_new_tokens: 2\n  batch_size: 2\n")
    partial = run / "export" / "step_0000009"  # a copy in progress
    shutil.copytree(export, partial)
    weights = (partial / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert [s for s, _ in complete_exports(run, kind=VLM)] == [5]
    assert complete_exports(run) == []  # not a clipdino encoder export

    def cli(*args):
        return subprocess.run([sys.executable, str(REPO / "launch" / "watch_evals.py"), str(run), *args],
                              capture_output=True, text=True, timeout=300)

    wrong_tasks = cli("--once", "--tasks", "knn")
    assert wrong_tasks.returncode == 2 and "VLM run" in wrong_tasks.stderr
    ok = cli("--once", "--", "--threads", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = read_ledger(run)
    assert [(r["step"], r["status"]) for r in rows] == [(5, "ok")], rows
    assert "vmcbench/overall" in rows[0]["summary"] and "vmcbench/OCR_macro" in rows[0]["summary"]
    results = json.loads((run / "evals" / "step_0000005" / "results.json").read_text())
    assert results["n"] == 3 and results["settings"]["max_new_tokens"] == 2 and results["settings"]["batch_size"] == 2
    assert "| 5 | ok |" in (run / "evals.md").read_text()
    shutil.rmtree(partial)
    assert Watcher(run, "vmcbench", str(data), kind=VLM).run(once=True) == 0  # evaluated once, never again


def test_vlm_watch_hook_checks_the_data(tmp_path):
    from types import SimpleNamespace

    from eval.watcher import vlm_eval_args, watch_from_config

    cfg = SimpleNamespace(model=SimpleNamespace(llm="tiny-qwen2"), eval=SimpleNamespace(data="", tasks="knn"),
                          data=SimpleNamespace(train=""))
    with pytest.raises(ValueError, match="set eval.data to its folder"):
        watch_from_config(cfg, tmp_path, start=False)
    cfg.eval.data = str(tmp_path)
    assert watch_from_config(cfg, tmp_path, start=False) is None
    assert vlm_eval_args({"limit": 50, "batch_size": None}) == ["--split", "dev", "--max-new-tokens", "16",
                                                                 "--batch-size", "8", "--limit", "50"]

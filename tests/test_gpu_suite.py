"""benchmarks/gpu_suite.{sh,py}: the GPU suite's CPU dry run (--cpu --tiny), its bookkeeping, the batch search of
`launch/bench.py train --batch auto`, and (slow) the offline install from a wheelhouse into a venv holding only torch."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
PARTS = ["env", "train_clip", "train_dino", "loss_clip", "loss_dino", "train_clip_compile", "train_dino_compile",
         "loss_siglip"]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def suite_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


def run_suite(*args: str, python: str = sys.executable, timeout: int = 1200, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=suite_env(PYTHON=python, **env),
                          capture_output=True, text=True, timeout=timeout)


def outputs(folder: Path) -> tuple[dict, str]:
    """The one JSON and the one markdown file the suite wrote into `folder`."""
    jsons, mds = sorted(folder.glob("gpu_suite_*.json")), sorted(folder.glob("gpu_suite_*.md"))
    assert len(jsons) == 1 and len(mds) == 1, sorted(p.name for p in folder.iterdir())
    assert jsons[0].stem == mds[0].stem and jsons[0].stem.endswith("_cpu_tiny")
    return json.loads(jsons[0].read_text()), mds[0].read_text()


def check_cpu_tiny_run(proc: subprocess.CompletedProcess, out: Path) -> dict:
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    suite, md = outputs(out)
    parts = {p["name"]: p for p in suite["parts"]}
    assert list(parts) == PARTS
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["error"] for n, p in parts.items()}
    assert suite["figures_meaningful"] is False and "mean nothing" in suite["note"] and "mean nothing" in md
    assert suite["mode"] == "cpu --tiny" and set(suite["slices_s"]) == set(PARTS)
    env = parts["env"]["reports"]["main"]
    assert all("error" not in env["imports"][m] for m in ("torch", "deepspeed", "open_clip", "timm", "webdataset"))
    for name in ("train_clip", "train_dino", "train_clip_compile", "train_dino_compile"):
        r = parts[name]["reports"]["main"]
        assert r["device"] == "cpu" and r["model"] == "vit_micro" and r["steps"] == 2
        assert all(s["samples_per_s"] > 0 and s["mfu"] > 0 for s in r["sides"].values()), name
    clip, clip_compiled = parts["train_clip"]["reports"]["main"], parts["train_clip_compile"]["reports"]["main"]
    assert set(clip["sides"]) == {"ours", "open_clip"} and clip["ratio"] > 0
    assert [t["batch"] for t in clip["batch_search"]] == [32] and clip["batch"] == 32  # CPU: the largest that runs
    assert set(clip_compiled["sides"]) == {"ours", "ours+compile", "open_clip", "open_clip+compile"}
    assert clip_compiled["batch"] == clip["batch"] and clip_compiled["batch_search"] is None
    dino_compiled = parts["train_dino_compile"]["reports"]["main"]
    assert set(dino_compiled["sides"]) == {"ours", "ours+compile"}
    assert dino_compiled["batch"] == parts["train_dino"]["reports"]["main"]["batch"] == 16
    for name, batches in (("loss_clip", [64, 128]), ("loss_siglip", [64, 128]), ("loss_dino", [8])):
        reports = parts[name]["reports"]
        assert set(reports) == {"fused", "torch"}
        assert [x["batch"] for x in reports["fused"]["results"]] == batches
        assert all(x["peak_alloc_bytes"] > 0 for r in reports.values() for x in r["results"])
    for heading in ("## Parts", "## Train steps", "## Losses"):
        assert heading in md
    assert md.count("| ok |") == len(PARTS) and "ours+compile" in md
    return suite


def test_cpu_tiny_dry_run_runs_every_step(tmp_path: Path) -> None:
    """Every part of the suite, tiny, on the CPU, with the packages this venv has (no wheelhouse)."""
    start = time.monotonic()
    proc = run_suite("--cpu", "--tiny", "--wheelhouse", "none", "--out", str(tmp_path))
    suite = check_cpu_tiny_run(proc, tmp_path)
    assert "--wheelhouse none" in suite["environment"]["install"]
    print(f"cpu --tiny dry run: {time.monotonic() - start:.0f} s")


def test_usage_errors() -> None:
    proc = run_suite("--cpu", "--wheelhouse", "none", timeout=60)
    assert proc.returncode == 2 and "--cpu runs only with --tiny" in proc.stderr
    proc = run_suite("--cpu", "--tiny", "--wheelhouse", "/nonexistent/wheelhouse", timeout=60)
    assert proc.returncode == 2 and "no wheelhouse at /nonexistent/wheelhouse" in proc.stderr
    proc = run_suite("--cpu", "--tiny", "--frobnicate", timeout=60)
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr


def test_spent_budget_leaves_rows_saying_so(tmp_path: Path) -> None:
    proc = run_suite("--cpu", "--tiny", "--wheelhouse", "none", "--only", "loss_dino,loss_clip", "--budget", "5",
                     "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    suite, md = outputs(tmp_path)
    assert [(p["name"], p["status"]) for p in suite["parts"]] == [("loss_clip", "not run"), ("loss_dino", "not run")]
    assert md.count("| not run |") == 2


def test_a_part_past_its_limit_is_killed_and_recorded(tmp_path: Path) -> None:
    suite = load("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    part = suite.Part("sleepy", "loss", 1.0, lambda part, scratch, done: [("fused", sleeper, None)])
    start = time.monotonic()
    record = suite.run_part(part, tmp_path, {}, 2.0, suite_env())
    assert time.monotonic() - start < 20
    assert record["status"] == "timed out" and "killed at the part's limit of 2 s" in record["error"]
    failing = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    part = suite.Part("broken", "loss", 1.0, lambda part, scratch, done: [("fused", failing, None)])
    record = suite.run_part(part, tmp_path, {}, 30.0, suite_env())
    assert record["status"] == "failed" and record["error"] == "fused: exit code 3: boom"


def test_batch_search_takes_the_largest_that_fits() -> None:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from bench_train_engine import search_batch
    finally:
        sys.path.remove(str(REPO / "launch"))

    def probe(batch: int) -> int:
        if batch > 512:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return batch * 2**20  # 1 MiB per sample

    batch, tried = search_batch(probe, [128, 1024, 256, 768, 512], limit_bytes=300 * 2**20)
    assert batch == 256
    assert [(t["batch"], t["result"]) for t in tried] == [(1024, "out of memory"), (768, "out of memory"),
                                                          (512, "over the memory limit"), (256, "ok")]
    assert search_batch(probe, [512, 64], limit_bytes=None)[0] == 512
    with pytest.raises(RuntimeError, match="no candidate batch fits"):
        search_batch(probe, [2048, 1024], limit_bytes=None)

    def broken(batch: int) -> int:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # not a memory error: not swallowed
        search_batch(broken, [8], limit_bytes=None)


# ----------------------------------------------------------------------------- slow: a fresh venv, offline install
@pytest.mark.slow
def test_fresh_venv_installs_the_wheelhouse_offline(tmp_path: Path) -> None:
    """A venv holding only torch, installed as pip is configured here (pip config list: file:///opt/pypi/simple and
    file:///opt/pypi-more/simple beside PyPI hold torch 2.14.1 and its CUDA wheels on local disk; a few small
    dependencies come from PyPI), + the local-platform wheelhouse (built if absent: pip download from the registry)
    -> gpu_suite.sh --cpu --tiny installs it with pip --no-index and runs every part, with any network use by pip or
    the hub pointed at a dead local proxy."""
    given = os.environ.get("CLIPDINO_LOCAL_WHEELHOUSE")  # one built by `make gpu-wheels PLATFORM=local WHEELHOUSE=...`
    wheelhouse = Path(given) if given else tmp_path / "wheelhouse"
    base_python = getattr(sys, "_base_executable", sys.executable)
    timings = {}
    start = time.monotonic()
    if not given:
        build = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_wheels.sh"), "--platform", "local", "--out",
                                str(wheelhouse)], cwd=REPO, env=suite_env(PYTHON=base_python), capture_output=True,
                               text=True, timeout=900)
        assert build.returncode == 0, build.stdout + build.stderr
    timings["wheelhouse"] = time.monotonic() - start

    venv, start = tmp_path / "venv", time.monotonic()
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    torch_version = importlib.metadata.version("torch")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              f"torch=={torch_version}"], env=suite_env(), capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout + install.stderr
    timings["venv_with_torch"] = time.monotonic() - start
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower().replace("_", "-") for line in listed.splitlines()}
    assert "torch" in names and not names & {"open-clip-torch", "deepspeed", "webdataset", "timm", "numpy"}, names

    out, site, start = tmp_path / "out", tmp_path / "site", time.monotonic()
    dead = "http://127.0.0.1:9"
    proc = run_suite("--cpu", "--tiny", "--wheelhouse", str(wheelhouse), "--out", str(out), python=python,
                     timeout=1800, GPU_SUITE_SITE=str(site), PIP_NO_INDEX="1", HTTP_PROXY=dead, HTTPS_PROXY=dead,
                     http_proxy=dead, https_proxy=dead)
    timings["suite"] = time.monotonic() - start
    suite = check_cpu_tiny_run(proc, out)
    assert "installed offline into" in suite["environment"]["install"] and str(site) in proc.stdout
    imports = next(p for p in suite["parts"] if p["name"] == "env")["reports"]["main"]["imports"]
    for module in ("deepspeed", "open_clip", "timm", "webdataset"):  # from the wheelhouse, not from elsewhere
        assert imports[module]["file"].startswith(str(site)), (module, imports[module])
    assert imports["torch"]["file"].startswith(str(venv))
    print("fresh venv test: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))

"""Run evaluation tasks on one export (optionally beside a second one) and write results.json / results.md.

    results = run_eval(EvalSettings(checkpoint="runs/x/export/step_0000100", data="data_cache/synthetic",
                                    out="runs/x/evals/step_0000100", tasks=("linear_probe", "knn")))

Input problems (unknown task, missing / partial export, data the tasks cannot use) raise ValueError /
FileNotFoundError with a one-line message before any work. A task that fails at run time is recorded as
{"error": ...} in results.json (the others still run) and `results["failed"]` lists it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from eval.context import EvalContext, EvalSettings, LoadedModel, load_model
from eval.data import open_eval_data
from eval.disagreement import Thresholds
from eval.features import settings_dict
from eval.report import render_markdown
from eval.tasks import TASKS, Skip, check_data_for, parse_tasks

RESULTS_FORMAT = "clipdino-eval"


def describe_model(model: LoadedModel) -> dict[str, Any]:
    meta = model.config.get("meta") or {}
    return {"name": model.name, "export": model.export_dir, "kind": model.kind,
            "params_m": sum(p.numel() for p in model.module.parameters()) / 1e6,
            "native_image_size": model.config["vision"]["image_size"], "step": meta.get("step"),
            "objective": meta.get("objective"), "source": meta.get("source")}


def run_eval(settings: EvalSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    start = time.perf_counter()
    tasks = parse_tasks(settings.tasks)
    check_settings(settings)
    data = open_eval_data(settings.data, settings.label)
    check_data_for(tasks, data)
    model = load_model(settings.checkpoint, settings, settings.name)
    compare = load_model(settings.compare, settings, settings.compare_name) if settings.compare else None
    if compare is not None and compare.name == model.name:
        compare.name += " (B)"
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = EvalContext(settings, data, model, compare, out, log)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "version": 1, "model": describe_model(model),
        "compare": describe_model(compare) if compare else None, "data": data.describe(),
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("progress",)},
                     "tasks": list(tasks), "extract": settings_dict(model.extract)},
        "tasks": {}, "summary": {}, "failed": []}
    for name in tasks:
        t0 = time.perf_counter()
        log(f"[eval] {name} ...")
        try:
            result = TASKS[name].fn(ctx)
        except Skip as e:
            result = {"skipped": str(e)}
        except Exception as e:  # isolate: the other tasks still run, the failure is recorded
            result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
            results["failed"].append(name)
            log(f"[eval] {name} failed: {result['error']}\n{traceback.format_exc(limit=6)}")
        result["time_s"] = time.perf_counter() - t0
        for key, value in (result.pop("summary", None) or {}).items():
            results["summary"][f"{name}/{key}"] = value
        results["tasks"][name] = result
        log(f"[eval] {name}: " + (f"skipped ({result['skipped']})" if "skipped" in result else
                                  "failed" if "error" in result else f"done in {result['time_s']:.1f} s"))
    results["timing"] = {"total_s": time.perf_counter() - start, "features": ctx.timings}
    results = jsonable(results)
    write_results(results, out)
    return results


def check_settings(s: EvalSettings) -> None:
    """Reject impossible numbers in one line, before any work."""
    from eval.knn import KNN_PRESETS
    from eval.linear_probe import PROTOCOLS

    if s.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {s.protocol!r}")
    if s.select_on not in (None, "heldout", "val"):
        raise ValueError(f"--select-on must be heldout or val, got {s.select_on!r}")
    if s.protocol == "authors" and s.select_on == "heldout":
        raise ValueError("--protocol authors chooses grid point and epoch on val (their code); --select-on heldout "
                         "needs --protocol corrected")
    if s.knn_preset not in KNN_PRESETS:
        raise ValueError(f"--knn-preset must be one of {', '.join(KNN_PRESETS)}, got {s.knn_preset!r}")
    positive = {"--knn-k": 1 if s.knn_k is None else s.knn_k, "--pairs-per-factor": s.pairs_per_factor,
                "--batch-size": s.batch_size, "--factor-probe-epochs": s.factor_probe_epochs,
                "--top-pairs": s.top_pairs, "--image-size": s.image_size or 1, "--probe-epochs": s.probe_epochs or 1,
                "--probe-grid-epochs": s.probe_grid_epochs or 1, "--probe-batch-size": s.probe_batch_size or 1}
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    bad += [f"--max-pair-images={s.max_pair_images} (needs >= 2)"] if s.max_pair_images < 2 else []
    bad += [f"--knn-temperature={s.knn_temperature}"] if s.knn_temperature <= 0 else []
    bad += [f"--workers={s.workers}"] if s.workers < 0 else []
    if bad:
        raise ValueError(f"invalid settings: {', '.join(bad)} (must be positive)")
    Thresholds.parse(s.thresholds)
    check_device(s.resolved_device())


def check_device(name: str) -> None:
    """--device names a device this machine has (one line otherwise, before any work)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device ({str(e).splitlines()[0]})") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: choose auto, cpu, cuda or cuda:N")


def jsonable(x: Any) -> Any:
    """Tensors -> lists, tuples -> lists, NaN / inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(results: dict[str, Any], out: Path) -> None:
    """results.md, then results.json last (atomically): a folder with results.json is complete."""
    (out / "results.md").write_text(render_markdown(results))
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2, allow_nan=False)
    os.replace(tmp, out / "results.json")

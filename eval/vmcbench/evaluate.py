"""One VMCBench evaluation, from a model folder or from another tool's responses, to an output folder.

    results = evaluate_vmcbench("runs/vlm/export/step_0001000", "/data/VMCBench", "evals/vmc", split="dev")
    results = evaluate_vmcbench(None, "/data/VMCBench", "evals/vmc", responses="lmms_responses.jsonl")
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from eval.vmcbench.data import Question, VMCBenchDataError, evenly_spaced, load_questions
from eval.vmcbench.parse import RandomFallback
from eval.vmcbench.report import write_outputs
from eval.vmcbench.scoring import GROUPS, aggregate, score_likelihoods, score_responses

PathLike = Union[str, Path]


def evaluate_vmcbench(model_dir: Optional[PathLike], data: PathLike, out_dir: PathLike, split: str = "dev",
                      limit: Optional[int] = None, mode: str = "generate", batch_size: int = 8,
                      max_new_tokens: int = 16, device: str = "auto", dtype: str = "auto",
                      random_fallback: Optional[int] = None, responses: Optional[PathLike] = None,
                      name: Optional[str] = None, progress: bool = True,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score `model_dir` (a Hugging Face LLaVA folder) or a `responses` JSONL on VMCBench; returns results.json's
    dict. Raises VMCBenchDataError / VMCBenchModelError (ValueErrors) with one-line messages."""
    start = time.perf_counter()
    if (model_dir is None) == (responses is None):
        raise ValueError("give a model folder or a responses file (one of the two)")
    if responses is not None and mode != "generate":
        raise ValueError(f"--mode {mode} needs the model: a responses file can only be scored as generation")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch size and max new tokens must be at least 1 (got {batch_size}, {max_new_tokens})")
    questions = load_questions(data, split, with_images=responses is None)
    split_indexes, n_total = {q.index for q in questions}, len(questions)
    if limit is not None:
        questions = evenly_spaced(questions, limit)
    log(f"[vmcbench] {len(questions)} {split} questions from {data}")
    settings: dict[str, Any] = {"random_fallback": random_fallback}
    timing: dict[str, float] = {}
    generation, likelihood = None, None
    if responses is not None:
        texts = read_responses(Path(responses), questions, split_indexes)
        model_info = {"name": name or Path(responses).stem, "source": str(Path(responses).resolve()),
                      "kind": "responses"}
        generation = texts
    else:
        from eval.vmcbench.runner import load_vlm, resolve_device, resolve_dtype, run_model

        resolved = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, resolved)
        t = time.perf_counter()
        model, processor = load_vlm(model_dir, resolved, torch_dtype)
        timing["load_s"] = round(time.perf_counter() - t, 2)
        log(f"[vmcbench] loaded {model_dir} ({model.config.model_type}) on {resolved}")
        t = time.perf_counter()
        outputs = run_model(model, processor, questions, mode, batch_size, max_new_tokens, progress)
        timing["run_s"] = round(time.perf_counter() - t, 2)
        generation, likelihood = outputs.responses, outputs.logprobs
        model_info = {"name": name or _model_name(Path(model_dir)), "source": str(Path(model_dir).resolve()),
                      "kind": "model", "model_type": model.config.model_type,
                      "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
        settings.update(batch_size=batch_size, max_new_tokens=max_new_tokens, device=resolved,
                        dtype=str(torch_dtype).removeprefix("torch."), decoding="greedy")

    predictions, results = _score(questions, generation, likelihood, random_fallback, log)
    timing["total_s"] = round(time.perf_counter() - start, 2)
    results.update(model=model_info, mode=mode, settings=settings, timing=timing,
                   data={"source": str(Path(data).resolve()), "split": split, "n": len(questions),
                         "n_total": n_total, "limit": limit})
    results["summary"] = summary(results)
    results["failed"] = []
    write_outputs(Path(out_dir), results, predictions)
    return results


def _model_name(folder: Path) -> str:
    # runs/NAME/export/step_0001000 -> NAME@step_0001000
    return f"{folder.parents[1].name}@{folder.name}" if folder.parent.name == "export" else folder.name


def _score(questions: Sequence[Question], generation: Optional[list[str]],
           likelihood: Optional[list[dict[str, float]]], seed: Optional[int], log: Callable[[str], None]
           ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    def warn(message: str) -> None:
        log(f"[vmcbench] warning: {message}")

    results: dict[str, Any] = {}
    rows = []
    if generation is not None:
        fallback = RandomFallback(seed) if seed is not None else None
        rows = score_responses(questions, generation, fallback)
        results.update(aggregate(rows, warn))
    if likelihood is not None:
        by_likelihood = score_likelihoods(questions, likelihood)
        scores = aggregate(by_likelihood, warn if generation is None else lambda m: None)
        if generation is None:
            results.update(scores)
            rows = by_likelihood
        else:
            for row, lik in zip(rows, by_likelihood):
                row["likelihood"] = {k: lik[k] for k in ("parsed", "correct", "logprobs")}
        results["likelihood"] = scores
    return rows, results


def summary(results: dict[str, Any]) -> dict[str, float]:
    """Flat metrics for the run watcher's evals.md / evals.png (None values left out)."""
    out: dict[str, float] = {}
    scorings = [("vmcbench", results)] if results["mode"] != "likelihood" else []
    scorings += [("vmcbench_likelihood", results["likelihood"])] if "likelihood" in results else []
    for prefix, scores in scorings:
        out[f"{prefix}/overall"] = scores["overall"]
        for kind in ("micro", "macro"):
            for group in GROUPS:
                if scores["groups"][kind].get(group) is not None:
                    out[f"{prefix}/{group}_{kind}"] = scores["groups"][kind][group]
    return out


def read_responses(path: Path, questions: Sequence[Question], split_indexes: set) -> list[str]:
    """The response to each question from a JSONL of {"index", "response"} lines (any other keys ignored)."""
    if not path.is_file():
        raise VMCBenchDataError(f"responses file {path} does not exist")
    keys = {str(i): i for i in split_indexes}
    found: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise VMCBenchDataError(f"{where}: not valid JSON ({e.msg})")
            if not isinstance(row, dict) or "index" not in row or "response" not in row:
                raise VMCBenchDataError(f"{where}: expected an object with \"index\" and \"response\"")
            key = str(row["index"])
            if key not in keys:
                raise VMCBenchDataError(f"{where}: index {row['index']!r} is not a question of this split")
            if key in found:
                raise VMCBenchDataError(f"{where}: a second response for index {row['index']!r}")
            found[key] = "" if row["response"] is None else str(row["response"])
    missing = [str(q.index) for q in questions if str(q.index) not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise VMCBenchDataError(f"{path}: no response for index {', '.join(missing[:5])}{more} "
                                f"({len(missing)} of {len(questions)} questions)")
    return [found[str(q.index)] for q in questions]

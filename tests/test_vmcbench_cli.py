"""launch/eval_vmcbench.py end to end: a tiny LLaVA folder generating, a responses file scored, one-line errors."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from eval.vmcbench.scoring import GROUPS, UNGROUPED
from eval.vmcbench.tiny import tiny_rows, write_parquet, write_tiny_llava, write_tiny_vmcbench

CATEGORIES = [c for members in GROUPS.values() for c in members]  # every grouped category once


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_vmcbench(tmp_path_factory.mktemp("vmcbench"), tiny_rows(CATEGORIES))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava")


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "launch" / "eval_vmcbench.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def one_line_error(out, code=2):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and lines[-1].startswith("error:")
    return lines[-1]


def test_generation_run_on_a_tiny_llava(tiny_llava, dataset, tmp_path):
    out = cli("--model", tiny_llava, "--data", dataset, "--out", tmp_path, "--mode", "both", "--batch-size", 4,
              "--max-new-tokens", 4, "--threads", 1, "--random-fallback", 0)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    n = len(CATEGORIES)
    for scores in (results, results["likelihood"]):
        assert scores["n"] == n and isinstance(scores["overall"], float)
        assert set(scores["groups"]) == {"micro", "macro"}
        for kind in ("micro", "macro"):
            assert set(scores["groups"][kind]) == set(GROUPS)  # no ungrouped category in this file
            assert all(isinstance(v, float) for v in scores["groups"][kind].values())
        assert set(scores["categories"]) == set(CATEGORIES)
    assert results["unparsed"] == results["random_fallback"] <= n
    assert results["mode"] == "both" and results["data"]["split"] == "dev" and results["model"]["model_type"] == "llava"
    assert results["settings"]["max_new_tokens"] == 4 and results["settings"]["decoding"] == "greedy"
    assert "total_s" in results["timing"] and "vmcbench/OCR_micro" in results["summary"]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == n
    assert set(predictions[0]) >= {"index", "category", "answer", "response", "parsed", "correct", "likelihood"}
    assert (tmp_path / "groups.png").stat().st_size > 1000
    assert "micro % (lmms-eval)" in (tmp_path / "results.md").read_text()


def test_batching_and_likelihood_paths_agree(tiny_llava, dataset):
    import torch

    from eval.vmcbench.data import load_questions
    from eval.vmcbench.runner import load_vlm, run_model

    questions = load_questions(dataset, limit=5)
    model, processor = load_vlm(tiny_llava)
    one = run_model(model, processor, questions, "both", batch_size=1, max_new_tokens=3, progress=False)
    four = run_model(model, processor, questions, "both", batch_size=4, max_new_tokens=3, progress=False)
    forward = run_model(model, processor, questions, "likelihood", batch_size=4, progress=False)
    assert one.responses == four.responses and forward.responses is None  # left padding changes nothing
    for a, b, c in zip(one.logprobs, four.logprobs, forward.logprobs):
        assert torch.allclose(torch.tensor(list(a.values())), torch.tensor(list(b.values())), atol=1e-4)
        assert torch.allclose(torch.tensor(list(b.values())), torch.tensor(list(c.values())), atol=1e-4)


def test_responses_scored_without_a_model(dataset, tmp_path):
    rows = tiny_rows(CATEGORIES + ["PathVQA"])
    tsv = tmp_path / "VMCBench_DEV.tsv"
    from eval.vmcbench.tiny import write_tsv

    write_tsv(tsv, rows)
    # right for every Reasoning question, "no idea" elsewhere
    responses = [{"index": r["index"], "response": f"({r['answer']})" if r["category"] in GROUPS["Reasoning"]
                  else "no idea"} for r in rows]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in responses))
    out = cli("--responses", path, "--data", tsv, "--out", tmp_path / "scored")
    assert out.returncode == 0, out.stderr
    assert "PathVQA" in out.stderr and "warning" in out.stderr
    results = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert results["groups"]["micro"]["Reasoning"] == results["groups"]["macro"]["Reasoning"] == 100.0
    assert results["groups"]["micro"]["OCR"] == 0.0 and results["groups"]["micro"][UNGROUPED] == 0.0
    reasoning = len(GROUPS["Reasoning"])
    assert results["overall"] == pytest.approx(100 * reasoning / len(rows), abs=1e-3)
    assert results["unparsed"] == len(rows) - reasoning and results["model"]["kind"] == "responses"
    drawn = cli("--responses", path, "--data", tsv, "--out", tmp_path / "drawn", "--random-fallback", 0)
    assert drawn.returncode == 0, drawn.stderr
    results = json.loads((tmp_path / "drawn" / "results.json").read_text())
    assert results["random_fallback"] == results["unparsed"] == len(rows) - reasoning
    assert results["settings"]["random_fallback"] == 0


def test_bad_input_is_one_line(dataset, tiny_llava, tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text('{"index": 0, "response": "A"}\nnot json\n')
    assert "responses.jsonl line 2: not valid JSON" in one_line_error(cli("--responses", path, "--data", dataset,
                                                                          "--out", tmp_path / "o"))
    rows = tiny_rows(["MMMU", "GQA"])
    rows[1]["image"] = None
    broken = write_parquet(tmp_path / "broken.parquet", rows)
    error = one_line_error(cli("--model", tiny_llava, "--data", broken, "--out", tmp_path / "o"))
    assert "broken.parquet row 1: image has no bytes" in error
    no_column = write_parquet(tmp_path / "no_answer.parquet", [{k: v for k, v in r.items() if k != "answer"}
                                                                for r in tiny_rows(["MMMU"])])
    error = one_line_error(cli("--responses", path, "--data", no_column, "--out", tmp_path / "o"))
    assert "no_answer.parquet: missing column(s) answer" in error
    error = one_line_error(cli("--model", tmp_path / "nowhere", "--data", dataset, "--out", tmp_path / "o"))
    assert "nowhere is not a Hugging Face model folder" in error
    usage = cli("--model", tiny_llava, "--data", dataset, "--out", tmp_path / "o", "--split", "val")
    assert usage.returncode == 1 and "--split: invalid choice: 'val'" in usage.stderr
    assert len(usage.stderr.strip().splitlines()) == 1
    both = cli("--model", tiny_llava, "--responses", path, "--data", dataset, "--out", tmp_path / "o")
    assert both.returncode == 1 and "not allowed with argument" in both.stderr
    assert not (tmp_path / "o" / "results.json").exists()

"""VMCBench (suyc21/VMCBench) for the VLM stage, scored as lmms-eval and VLMEvalKit publish it (docs/vlm.md).

    data.py      the dataset as published: parquet (Hugging Face) or TSV (VLMEvalKit) -> Question rows
    parse.py     the prompt and the harnesses' answer parser; the seeded random fallback
    scoring.py   groups (+ synthetic categories), accuracy per category, micro (lmms-eval) / macro (VLMEvalKit)
    runner.py    a Hugging Face LLaVA folder: chat template, left-padded greedy batches, option likelihood
    report.py    results.json, results.md, predictions.jsonl, groups.png
    evaluate.py  `evaluate_vmcbench(model_dir, data, out_dir, ...)`: one evaluation end to end
"""
from eval.vmcbench.evaluate import evaluate_vmcbench  # noqa: F401

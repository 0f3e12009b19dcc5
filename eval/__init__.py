"""Evaluation harness: every export (ours, converted, released) through the same tasks (docs/eval.md).

    data.py        recognise a data folder (synthetic world / labeled shards / captions), read samples
    factors.py     synthetic-world factors as labels, caption-style prompts, controlled one-factor pairs
    features.py    CLS (+ joint embedding) extraction, cached on disk
    linear_probe.py, knn.py, zero_shot.py, retrieval.py   the classification / retrieval evaluators
    embedding.py, disagreement.py, analysis.py            the embedding analysis (the `embedding` task)
    text.py        tokenizer + text embeddings of a CLIP export
    tasks.py       task registry;  context.py  settings, loaded exports, memoised features
    runner.py      run tasks, write results.json / results.md;  report.py  the markdown;  plots.py  figures
    watcher.py     evaluate each new export of a run once (launch/watch_evals.py, eval.watch=true)
    bench.py       extraction / probe timing (python -m eval.bench)
"""

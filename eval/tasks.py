"""The task registry: evaluators by name, what each needs, and the four classification / retrieval tasks.

A task is `fn(ctx: EvalContext) -> dict`; its dict carries a "summary" of scalar metrics (what the watcher
tracks across checkpoints) beside any details. A task that cannot apply to this export (zero-shot without a
text tower, retrieval without captions) returns {"skipped": reason} instead of failing.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from eval.context import EvalContext
from eval.data import EvalData


class Skip(Exception):
    """The task does not apply here; the message says why."""


@dataclass(frozen=True)
class Task:
    fn: Callable[[EvalContext], dict[str, Any]]
    needs_labels: bool = False
    needs_train: bool = False


def linear_probe_task(ctx: EvalContext) -> dict[str, Any]:
    from eval.features import settings_dict
    from eval.linear_probe import authors_extract, linear_probe, preset

    s = ctx.settings
    extract = authors_extract(ctx.model.extract, ctx.model.config["vision"]) if s.protocol == "authors" else None
    train, val = ctx.features("train", extract=extract), ctx.features("val", extract=extract)
    cfg = preset(s.probe_preset, len(train), protocol=s.protocol, select_on=s.select_on, epochs=s.probe_epochs,
                 grid_epochs=s.probe_grid_epochs, batch_size=s.probe_batch_size, drop_last=s.probe_drop_last,
                 seed=s.seed)
    result = linear_probe(train.cls, train.labels, val.cls, val.labels, len(ctx.data.classes), cfg, ctx.device)
    if extract is not None:
        result["extract"] = settings_dict(extract)
    result["summary"] = {"top1": result["top1"]}
    return result


def knn_task(ctx: EvalContext) -> dict[str, Any]:
    from eval.features import settings_dict
    from eval.knn import knn_classify, knn_preset, preset_extract

    s = ctx.settings
    p = knn_preset(s.knn_preset, s.knn_k, s.knn_temperature)
    extract = preset_extract(ctx.model.extract, p)
    train, val = ctx.features("train", extract=extract), ctx.features("val", extract=extract)
    result = knn_classify(train.cls.to(ctx.device), train.labels, val.cls, val.labels, len(ctx.data.classes),
                          p.ks, p.temperature, headline_k=p.headline_k)
    result["preset"] = s.knn_preset
    if extract is not None:
        result["extract"] = settings_dict(extract)
    result["summary"] = {"top1": result["top1"], **{f"top1_k{k}": v["top1"] for k, v in
                                                   result.get("by_k", {}).items() if int(k) != result["k"]}}
    return result


def _text_encoder(ctx: EvalContext) -> Callable[[list[str]], Any]:
    from eval.text import NoTokenizer, encode_texts, tokenizer_for

    if not ctx.model.has_text:
        raise Skip(f"{ctx.model.kind} export: no text tower")
    try:
        tokenize = tokenizer_for(ctx.model.module, ctx.model.config)
    except NoTokenizer as e:
        raise Skip(str(e)) from None
    return lambda texts: encode_texts(ctx.model.module, tokenize, texts, ctx.device)


def zero_shot_task(ctx: EvalContext) -> dict[str, Any]:
    import torch

    from eval.zero_shot import class_prompts, classifier_weights, zero_shot_classify

    encode = _text_encoder(ctx)
    data = ctx.data
    if data.kind == "synthetic":
        from eval.factors import zero_shot_prompts

        prompts = zero_shot_prompts(data.label)
        if prompts is None:
            raise Skip(f"captions never name the {data.label} factor: no prompts")
    else:
        prompts = class_prompts(data.classes)
    val = ctx.features("val")
    names = list(prompts)
    to_row = {data.classes.index(n): r for r, n in enumerate(names)}  # class index -> classifier row
    keep = torch.tensor([int(y) in to_row for y in val.labels])
    labels = torch.tensor([to_row[int(y)] for y in val.labels[keep]], dtype=torch.long)
    result = zero_shot_classify(val.embeds[keep], labels, classifier_weights(prompts, encode))
    result.update(prompts_per_class=len(next(iter(prompts.values()))), example_prompts=prompts[names[0]][:3],
                  excluded_samples=int((~keep).sum()))
    result["summary"] = {"top1": result["top1"]}
    return result


def retrieval_task(ctx: EvalContext) -> dict[str, Any]:
    from eval.retrieval import retrieval_recall

    encode = _text_encoder(ctx)
    if not ctx.data.has_captions.get("val"):
        raise Skip("the val shards have no captions (txt)")
    val = ctx.features("val")
    result = retrieval_recall(val.embeds, encode(val.captions), captions=val.captions)
    result["distinct_captions"] = len(set(val.captions))
    result["summary"] = {k: result[k] for k in ("i2t_r1", "t2i_r1", "mean_recall")}
    return result


def embedding_task(ctx: EvalContext) -> dict[str, Any]:
    from eval.analysis import embedding_analysis

    return embedding_analysis(ctx)


TASKS: dict[str, Task] = {
    # linear probe on CLS features (z-scored, AdamW, LR x WD grid; --protocol corrected | authors)
    "linear_probe": Task(linear_probe_task, needs_labels=True, needs_train=True),
    "knn": Task(knn_task, needs_labels=True, needs_train=True),  # weighted kNN (DINO; --knn-preset default | dino)
    "zero_shot": Task(zero_shot_task, needs_labels=True),  # zero-shot classification (text tower)
    "retrieval": Task(retrieval_task),  # image-text retrieval recall@1/5/10 on val captions
    "embedding": Task(embedding_task),  # factor sensitivity, class similarity, disagreement pairs
}


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"a,b" -> ("a", "b"), unknown names rejected with the closest known one."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise ValueError(f"no tasks given; choose from {', '.join(TASKS)}")
    for name in names:
        if name not in TASKS:
            close = difflib.get_close_matches(name, list(TASKS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown task {name!r}{hint}; choose from {', '.join(TASKS)}")
    return tuple(dict.fromkeys(names))


def check_data_for(tasks: tuple[str, ...], data: EvalData) -> None:
    """Fail early, in one line, when the data cannot serve a requested task."""
    labelled = [t for t in tasks if TASKS[t].needs_labels]
    if labelled and data.kind == "unlabeled":
        rest = [t for t in tasks if not TASKS[t].needs_labels]
        raise ValueError(f"{data.root} has no labels (no world.json or classes.json): {', '.join(labelled)} need "
                         f"them" + (f"; run --tasks {','.join(rest)}" if rest else ""))
    if not data.splits.get("val"):
        raise ValueError(f"{data.root} has no val-NNNNNN.tar shards (every task evaluates the val split)")
    trained = [t for t in tasks if TASKS[t].needs_train]
    if trained and not data.splits.get("train"):
        raise ValueError(f"{data.root} has no train-NNNNNN.tar shards: {', '.join(trained)} fit on train")

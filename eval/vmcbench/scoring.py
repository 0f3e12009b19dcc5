"""Per-question scores -> accuracy per category, per group under both harnesses' conventions, and overall.

    predictions = score_responses(questions, responses, fallback=None)    # parsed letter + correct, per question
    summary = aggregate(predictions)    # {"overall", "groups": {"micro", "macro"}, "categories", "unparsed", "n"}

- micro (lmms-eval `tasks/vmcbench`): a group's accuracy is the mean over its questions;
- macro (VLMEvalKit `VMCBenchDataset`): the mean of its categories' accuracies (each source dataset counts once);
- overall: the mean over all questions (both harnesses).
Categories are matched to groups case-insensitively, ignoring punctuation, spaces and `_` ("A-OKVQA", "AOKVQA",
"a_okvqa" are one), plus a few other spellings (ALIASES). A category in no group is reported as `ungrouped`
with a warning, never dropped (lmms-eval raises a KeyError; VLMEvalKit leaves it out of every group).
All values are percentages; a group without questions (e.g. under --limit) is None.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional, Sequence

from eval.vmcbench.data import CHOICES, Question
from eval.vmcbench.parse import parse_choice

GROUPS: dict[str, tuple[str, ...]] = {
    "General": ("SEEDBench", "MMStar", "A-OKVQA", "VizWiz", "MMVet", "VQAv2", "OKVQA",
                "synthetic_shape", "synthetic_color"),
    "Reasoning": ("MMMU", "MathVista", "ScienceQA", "RealWorldQA", "GQA", "MathVision",
                  "synthetic_count", "synthetic_compare"),
    "OCR": ("TextVQA", "OCRVQA", "synthetic_word"),
    "Doc&Chart": ("AI2D", "ChartQA", "DocVQA", "InfoVQA", "TableVQABench", "synthetic_chart", "synthetic_table"),
}
UNGROUPED = "ungrouped"
# other spellings of the sources' names (after normalisation: lower case, letters and digits only)
ALIASES = {"seedbenchimg": "SEEDBench", "seed": "SEEDBench", "mmvetv1": "MMVet", "vqav2val": "VQAv2",
           "mathv": "MathVision", "mathvisionmini": "MathVision", "sqa": "ScienceQA", "scienceqaimg": "ScienceQA",
           "realworld": "RealWorldQA", "ocrbenchvqa": "OCRVQA", "infographicvqa": "InfoVQA", "infovqaval": "InfoVQA",
           "docvqaval": "DocVQA", "tablevqa": "TableVQABench", "ai2ddiagram": "AI2D", "ai2dtest": "AI2D",
           "chartqatest": "ChartQA", "textvqaval": "TextVQA", "gqatestdev": "GQA"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_CANONICAL = {_key(c): c for members in GROUPS.values() for c in members}
_GROUP_OF = {c: g for g, members in GROUPS.items() for c in members}


def canonical_category(name: str) -> Optional[str]:
    """The harnesses' spelling of a source name ("aokvqa" -> "A-OKVQA"); None when it belongs to no group."""
    key = _key(name)
    return _CANONICAL.get(key) or ALIASES.get(key)


def group_of(name: str) -> str:
    canonical = canonical_category(name)
    return _GROUP_OF[canonical] if canonical else UNGROUPED


def score_responses(questions: Sequence[Question], responses: Sequence[str],
                    fallback: Optional[Callable[[], str]] = None) -> list[dict[str, Any]]:
    """One prediction row per question (dataset order, so seeded fallback letters are reproducible)."""
    rows = []
    for q, response in zip(questions, responses, strict=True):
        parsed = parse_choice(response, q.options)
        row = {"index": q.index, "category": q.category, "answer": q.answer, "response": response,
               "parsed": parsed}
        if parsed is None and fallback is not None:
            row["fallback"] = fallback()
        row["correct"] = (parsed or row.get("fallback")) == q.answer
        rows.append(row)
    return rows


def score_likelihoods(questions: Sequence[Question], logprobs: Sequence[dict[str, float]]) -> list[dict[str, Any]]:
    """Option-likelihood predictions: the letter with the highest next-token log-probability."""
    rows = []
    for q, lp in zip(questions, logprobs, strict=True):
        best = max(CHOICES, key=lambda c: lp[c])  # a tie goes to the earlier letter
        rows.append({"index": q.index, "category": q.category, "answer": q.answer,
                     "logprobs": {c: round(lp[c], 4) for c in CHOICES}, "parsed": best, "correct": best == q.answer})
    return rows


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _pct(fraction: Optional[float]) -> Optional[float]:
    return None if fraction is None else round(100.0 * fraction, 4)


def aggregate(predictions: Sequence[dict[str, Any]], warn: Callable[[str], None] = warnings.warn) -> dict[str, Any]:
    """Accuracy per category, per group (micro and macro), overall; unparsed and fallback counts."""
    by_category: dict[str, list[bool]] = {}
    for p in predictions:
        by_category.setdefault(p["category"], []).append(bool(p["correct"]))
    members: dict[str, list[str]] = {g: [] for g in GROUPS}
    for category in by_category:
        members.setdefault(group_of(category), []).append(category)
    if members.get(UNGROUPED):
        warn(f"VMCBench categories in no group, reported as '{UNGROUPED}': {', '.join(sorted(members[UNGROUPED]))}")
    accuracy = {c: _mean(hits) for c, hits in sorted(by_category.items())}
    micro = {g: _pct(_mean([h for c in names for h in by_category[c]])) for g, names in members.items()}
    macro = {g: _pct(_mean([accuracy[c] for c in names])) for g, names in members.items()}
    return {
        "overall": _pct(_mean([bool(p["correct"]) for p in predictions])),
        "groups": {"micro": micro, "macro": macro},
        "categories": {c: _pct(a) for c, a in accuracy.items()},
        "counts": {"categories": {c: len(h) for c, h in sorted(by_category.items())},
                   "groups": {g: sum(len(by_category[c]) for c in names) for g, names in members.items()}},
        "unparsed": sum(1 for p in predictions if "response" in p and p["parsed"] is None),
        "random_fallback": sum(1 for p in predictions if "fallback" in p),
        "n": len(predictions),
    }

"""The VMCBench prompt and the answer parser, as both published harnesses run them.

    prompt = build_prompt(question)                      # lmms-eval's text (VLMEvalKit: one space more, docs)
    letter = parse_choice("The answer is (B).", question.options)   # "B"; None when nothing is found

`parse_choice` follows `parse_multi_choice_response` of lmms-eval `tasks/vmcbench/utils.py`, which VLMEvalKit
`dataset/utils/vmcbench.py` repeats word for word (MMMU's parser plus the `X. ` form), including its quirks:
- the response is stripped of `, . ! ? ; : '` one character kind after the other (not as a set), then padded
  with a space on each side;
- step 1: `(X)` or `X. ` anywhere; step 2: ` X ` (a lone capital letter); step 3, only for more than 5 words:
  an option's text, case-insensitively; matching is case-sensitive for the letters (`b` is not found);
- several candidates: the one whose match starts last. In step 1 that position is the one of `(X)` only, so
  `X. `-only candidates tie at -1 and the first letter in A-D order wins (e.g. an echoed option list -> A);
- nothing found: the harnesses draw a random letter; here `parse_choice` returns None and the caller decides
  (scored wrong, or `RandomFallback`).
"""
from __future__ import annotations

import random
from typing import Optional

from eval.vmcbench.data import CHOICES, Question

STRIP = (",", ".", "!", "?", ";", ":", "'")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def build_prompt(q: Question) -> str:
    options = "".join(f"{c}. {q.options[c]}\n" for c in CHOICES)
    return f"Question: {q.question}\nOptions:\n{options}{INSTRUCTION}"


def parse_choice(response: str, options: dict[str, str]) -> Optional[str]:
    """The chosen letter (A-D), or None when the response names none."""
    text = str(response)
    for char in STRIP:
        text = text.strip(char)
    text = f" {text} "
    by_text = False
    candidates = [c for c in CHOICES if f"({c})" in text or f"{c}. " in text]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in CHOICES if f" {c} " in text]
    if not candidates and len(text.split()) > 5:
        candidates = [c for c in CHOICES if options[c].lower() in text.lower()]
        by_text = True
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        starts = [text.lower().rfind(options[c].lower()) for c in candidates]
    elif bracketed:
        starts = [text.rfind(f"({c})") for c in candidates]
    else:
        starts = [text.rfind(f" {c} ") for c in candidates]
    return candidates[starts.index(max(starts))]  # the first of equal maxima, as numpy's argmax


class RandomFallback:
    """The harnesses' random letter for unparsed responses, seeded: one `random.Random(seed)` stream,
    `choice(["A", "B", "C", "D"])` per unparsed response in dataset order. lmms-eval seeds Python's global
    `random` with 0 (its `--seed` default) once before evaluating and draws the same way, so seed 0 gives its
    letters when nothing else draws from the global stream in between; VLMEvalKit does not seed."""

    def __init__(self, seed: int):
        self.seed, self.rng, self.draws = seed, random.Random(seed), 0

    def __call__(self) -> str:
        self.draws += 1
        return self.rng.choice(list(CHOICES))

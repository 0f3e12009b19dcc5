"""The synthetic world's factors as class labels, their zero-shot prompts, and controlled image pairs.

Every factor becomes a categorical label: shape / word (+ "none") / count / color / style / size as named,
position as the 3x3 cell of the first object's centre, rotation as eight 45-degree bins (many shapes are
rotation-symmetric, so rotation is a weak label by construction). Controlled pairs come from
`data.synthetic.vary_factor` + `render_image`: the two images differ in exactly one factor.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional

from data import synthetic as syn

FACTOR_NAMES = ("shape", "word", "count", "color", "style", "size", "position", "rotation")
SEMANTIC = set(syn.SEMANTIC_FACTORS)
_CELLS = [f"{row}-{col}" for row in ("top", "middle", "bottom") for col in ("left", "centre", "right")]
CLASSES: dict[str, list[str]] = {
    "shape": list(syn.SHAPES), "word": [*syn.WORDS, "none"], "count": [str(c) for c in syn.COUNTS],
    "color": list(syn.COLORS), "style": list(syn.STYLES), "size": list(syn.SIZES), "position": _CELLS,
    "rotation": [f"{lo}-{lo + 45}" for lo in range(0, 360, 45)],
}


def factor_label(factors: dict[str, Any], name: str) -> int:
    """Index of the factor's value in CLASSES[name]."""
    if name == "word":
        return CLASSES["word"].index(factors["word"] or "none")
    if name == "count":
        return CLASSES["count"].index(str(factors["count"]))
    if name == "position":
        x, y = factors["position"]
        return 3 * min(int(y * 3), 2) + min(int(x * 3), 2)
    if name == "rotation":
        return int(float(factors["rotation"]) % 360 // 45)
    if name not in CLASSES:
        raise ValueError(f"unknown factor {name!r}; choose from {', '.join(FACTOR_NAMES)}")
    return CLASSES[name].index(factors[name])


def factor_labels(factors: dict[str, Any]) -> list[int]:
    """All factors' labels, in FACTOR_NAMES order."""
    return [factor_label(factors, name) for name in FACTOR_NAMES]


# ----------------------------------------------------------------------------- zero-shot prompts
# Templates in the style of the synthetic captions (data.synthetic.CAPTION_TEMPLATES with an article).
CAPTION_STYLE = ("{}", "photo of {}", "a picture of {}", "clipart of {}", "illustration of {}", "{}, vector art",
                 "stock image: {}", "drawing of {}")


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _word_phrases(word: str) -> list[str]:
    return [p.format(w=word) for p in syn.WORD_PHRASES[:2]]  # ' with the word "w"', ' with the text "w"'


# factor -> class value -> the phrases that name it (each goes into every template; the class embedding is
# the mean over all of them). Phrases mirror data.synthetic.make_caption.
PHRASES: dict[str, Callable[[str], list[str]]] = {
    "shape": lambda v: [_a(v)],
    "color": lambda v: [_a(f"{v} {s}") for s in syn.SHAPES],
    "count": lambda v: ([_a(s) for s in syn.SHAPES] if v == "1" else
                        [f"{syn.COUNT_WORDS[int(v)]} {syn.shape_noun(s, int(v))}" for s in syn.SHAPES]),
    "word": lambda v: [f"{_a(s)}{p}" for s in syn.SHAPES for p in _word_phrases(v)],
    "style": lambda v: [f"{_a(s)} on a {syn.STYLE_PHRASES[v]} background" for s in syn.SHAPES],
}


def zero_shot_prompts(factor: str) -> Optional[dict[str, list[str]]]:
    """class name -> prompts, or None when captions never name the factor (size, position, rotation).

    The word factor's "none" class has no prompt (captions of word-less images say nothing): those images
    are left out of word zero-shot."""
    if factor not in PHRASES:
        return None
    templates = CAPTION_STYLE if factor == "shape" else CAPTION_STYLE[:4]  # phrases x shapes: keep it affordable
    return {value: [t.format(p) for p in PHRASES[factor](value) for t in templates]
            for value in CLASSES[factor] if not (factor == "word" and value == "none")}


# ----------------------------------------------------------------------------- controlled pairs
def controlled_pairs(records: list[dict[str, Any]], factors: tuple[str, ...], pairs_per_factor: int, seed: int,
                     spec: syn.WorldSpec = syn.DEFAULT_SPEC) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """[(factor, base factors, varied factors)]: `pairs_per_factor` bases drawn from `records` per factor,
    varied within the world's spec (world.json)."""
    rng = random.Random(seed)
    out = []
    for factor in factors:
        for base in rng.sample(records, min(pairs_per_factor, len(records))):
            out.append((factor, base, syn.vary_factor(base, factor, rng, spec)))
    return out


def describe_change(base: dict[str, Any], varied: dict[str, Any], factor: str) -> str:
    """Human-readable change, e.g. "shape: star -> heart" (for plot labels)."""
    if factor in ("position",):
        return "position moved"
    if factor == "size":
        return f"size: {base['size']} -> {varied['size']}"
    if factor == "rotation":
        return f"rotation: {base['rotation']:.0f} -> {varied['rotation']:.0f}"
    return f"{factor}: {base[factor] if base[factor] is not None else 'none'} -> " \
           f"{varied[factor] if varied[factor] is not None else 'none'}"

"""The seven scene kinds of the synthetic VMCBench and one four-option question about each.

`make_item(category, seed, split, number, image_size)` is a pure function of its arguments: the
benchmark calls it on the world's "val" split, the stage-2 instruction data on "train", so every
benchmark category has training images of the same kind and no image is shared. Shape, colour
and word questions use the world's own samples (data/synthetic.py); count scenes re-render a
world sample with 1-6 well separated objects; comparisons, bar charts and tables are drawn here.
Each item also carries free-form and short (question, answer) turns about the same image.
"""
from __future__ import annotations

import hashlib
import math
import random
import textwrap
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.synthetic import COLORS, SHAPE_POLYGONS, SHAPES, STYLE_PHRASES, WORDS, make_sample, render_image, shape_noun

CATEGORIES = ("synthetic_shape", "synthetic_color", "synthetic_count", "synthetic_compare",
              "synthetic_word", "synthetic_chart", "synthetic_table")
GROUPS = {"General": ("synthetic_shape", "synthetic_color"),
          "Reasoning": ("synthetic_count", "synthetic_compare"),
          "OCR": ("synthetic_word",),
          "Doc&Chart": ("synthetic_chart", "synthetic_table")}
LETTERS = "ABCD"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA suffix
WORLD_INDEX_BASE = 10_000_000  # world samples used here start far above any pretraining world's size
COUNT_RANGE = (1, 6)
PALETTE = ("red", "orange", "green", "cyan", "blue", "purple", "pink", "brown")  # legible on white
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class SceneItem:
    """One rendered image, a four-option question about it, and other turns about the same image."""
    category: str
    split: str
    number: int
    image: Image.Image
    question: str
    options: tuple[str, str, str, str]
    answer: str  # the correct option's letter
    facts: dict  # what was rendered (JSON-serialisable); tests check the answer against it
    open_qa: tuple[tuple[str, str], ...]
    short_qa: tuple[tuple[str, str], ...]


def mc_prompt(question: str, options: tuple[str, ...]) -> str:
    """The VMCBench prompt (lmms-eval form), used verbatim for the training questions too."""
    lines = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options))
    return f"Question: {question}\nOptions:\n{lines}{MC_INSTRUCTION}"


def item_rng(seed: int, split: str, category: str, number: int, stream: str) -> random.Random:
    digest = hashlib.sha256(f"clipdino-vlm:{seed}:{split}:{category}:{number}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def answer_letter(seed: int, split: str, category: str, number: int) -> str:
    """Letters are a fresh permutation per block of four numbers: exactly balanced per category."""
    letters = list(LETTERS)
    item_rng(seed, split, category, number // 4, "letters").shuffle(letters)
    return letters[number % 4]


def world_index(category: str, number: int) -> int:
    """The world sample behind question `number` of a category; categories never share one."""
    return WORLD_INDEX_BASE + number * len(CATEGORIES) + CATEGORIES.index(category)


def make_item(category: str, seed: int, split: str, number: int, image_size: int = 64) -> SceneItem:
    if category not in BUILDERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = item_rng(seed, split, category, number, "question")
    image, question, correct, distractors, facts, open_qa, short_qa = BUILDERS[category](
        rng, seed, split, number, image_size)
    letter = answer_letter(seed, split, category, number)
    options = list(distractors)
    options.insert(LETTERS.index(letter), correct)
    if len(options) != 4 or len(set(options)) != 4:
        raise AssertionError(f"{category} #{number}: options must be four distinct strings, got {options}")
    return SceneItem(category, split, number, image, question, tuple(options), letter, facts,
                     tuple(open_qa), tuple(short_qa))


def _pick_others(rng: random.Random, pool, exclude, k: int = 3) -> list:
    return rng.sample([v for v in pool if v not in set(exclude)], k)


def _fill_numbers(rng: random.Random, correct: int, preferred: list[int], low: int, high: int) -> list[str]:
    """Three distinct numeric distractors: values shown in the image first, then random ones."""
    chosen = [v for v in dict.fromkeys(preferred) if v != correct][:3]
    while len(chosen) < 3:
        value = rng.randint(low, high)
        if value != correct and value not in chosen:
            chosen.append(value)
    rng.shuffle(chosen)
    return [str(v) for v in chosen]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------------------- world scenes

def object_phrase(factors: dict) -> str:
    """'a red star', 'three red stars' (the count spelled out)."""
    count, noun = factors["count"], shape_noun(factors["shape"], factors["count"])
    lead = NUMBER_WORDS[count] if count > 1 else _a(factors["color"])
    return f"{lead} {factors['color']} {noun}"


def where(position: list[float]) -> str:
    """A 3 x 3 grid name for a normalised position: 'top left', 'center', 'bottom right'."""
    row = ("top", "middle", "bottom")[min(int(position[1] * 3), 2)]
    col = ("left", "center", "right")[min(int(position[0] * 3), 2)]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def world_turns(factors: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Open and short turns about every factor of a world image."""
    count, noun = factors["count"], shape_noun(factors["shape"], factors["count"])
    open_qa = [("What shape is shown?", _sentence(object_phrase(factors))),
               ("What does the background look like?",
                f"A {STYLE_PHRASES[factors['style']]} background.")]
    short_qa = [("What shape is shown?", factors["shape"]),
                (f"What color {'is' if count == 1 else 'are'} the {noun}?", factors["color"]),
                (f"How many {shape_noun(factors['shape'], 2)} are there?", str(count)),
                ("What pattern does the background have?", factors["style"])]
    if factors.get("word"):
        open_qa.append(("What is written in the image?", f'The word "{factors["word"]}".'))
        short_qa.append(("What word is written in the image?", factors["word"]))
    else:
        open_qa.append(("Is there any text in the image?", "No, there is no text in the image."))
    if count == 1:
        open_qa.append((f"Where is the {noun}?", f"In the {where(factors['position'])} of the image."))
    return open_qa, short_qa


def _world(seed: int, split: str, category: str, number: int, image_size: int):
    image, _caption, factors = make_sample(seed, split, world_index(category, number), image_size)
    return image, factors


def _unhidden_world(seed: int, split: str, category: str, number: int, image_size: int):
    """The world sample, without its word when the word hides over 40% of the objects (else unanswerable).
    Judged at 32 px, so the same questions come at every image size."""
    small, factors = _world(seed, split, category, number, 32)
    if factors["word"]:
        bare = np.asarray(render_image({**factors, "word": None}, 32))
        empty = np.asarray(render_image({**factors, "count": 0, "word": None}, 32))
        objects = (bare != empty).any(-1)
        visible = objects & (np.asarray(small) == bare).all(-1)
        if visible.sum() < 0.6 * objects.sum():
            factors = {**factors, "word": None}
    return render_image(factors, image_size), factors


def _shape_item(rng, seed, split, number, image_size):
    image, factors = _unhidden_world(seed, split, "synthetic_shape", number, image_size)
    question = "Which shape is shown in the image?"
    facts = {"world_index": world_index("synthetic_shape", number), "factors": factors}
    return (image, question, factors["shape"], _pick_others(rng, SHAPES, [factors["shape"]]), facts,
            *world_turns(factors))


def _color_item(rng, seed, split, number, image_size):
    image, factors = _unhidden_world(seed, split, "synthetic_color", number, image_size)
    noun = shape_noun(factors["shape"], factors["count"])
    question = f"What color {'is' if factors['count'] == 1 else 'are'} the {noun}?"
    facts = {"world_index": world_index("synthetic_color", number), "factors": factors}
    return (image, question, factors["color"], _pick_others(rng, COLORS, [factors["color"]]), facts,
            *world_turns(factors))


def _word_item(rng, seed, split, number, image_size):
    """A world sample that always shows a word (one is drawn when the sample has none)."""
    _, factors = _world(seed, split, "synthetic_word", number, 32)
    if not factors["word"]:
        factors = {**factors, "word": rng.choice(WORDS)}
    image = render_image(factors, image_size)
    facts = {"world_index": world_index("synthetic_word", number), "factors": factors}
    return (image, "Which word is written in the image?", factors["word"],
            _pick_others(rng, WORDS, [factors["word"]]), facts, *world_turns(factors))


def _separated_positions(rng: random.Random, count: int, scale: float) -> list[list[float]] | None:
    """`count` centres whose objects do not touch (gap >= 0.25 radius), or None after 200 tries."""
    positions: list[list[float]] = []
    for _ in range(200):
        candidate = [round(rng.uniform(scale * 1.05, 1 - scale * 1.05), 4) for _ in range(2)]
        if all(math.dist(candidate, p) >= 2.25 * scale for p in positions):
            positions.append(candidate)
            if len(positions) == count:
                return positions
    return None


def _count_item(rng, seed, split, number, image_size):
    """A world sample re-rendered with 1-6 copies of its object, none touching, and no word."""
    _, factors = _world(seed, split, "synthetic_count", number, 32)
    count = rng.randint(*COUNT_RANGE)
    scale = factors["scale"] if count <= 2 else round(rng.uniform(0.09, 0.12), 3)
    positions = _separated_positions(rng, count, scale)
    while positions is None:  # rare: shrink until they fit
        scale = round(scale * 0.9, 3)
        positions = _separated_positions(rng, count, scale)
    factors = {**factors, "count": count, "scale": scale, "word": None,
               "position": positions[0], "other_positions": positions[1:]}
    image = render_image(factors, image_size)
    plural = shape_noun(factors["shape"], 2)
    question = f"How many {plural} are in the image?"
    facts = {"world_index": world_index("synthetic_count", number), "factors": factors}
    open_qa, short_qa = world_turns(factors)
    open_qa.insert(0, (question, f"There {'is' if count == 1 else 'are'} {object_phrase(factors)}."))
    distractors = _fill_numbers(rng, count, [], *COUNT_RANGE)
    return image, question, str(count), distractors, facts, open_qa, short_qa


# ----------------------------------------------------------------------------- drawn scenes

@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fitted_font(draw: ImageDraw.ImageDraw, texts: list[str], size: int, max_width: float):
    """The largest font <= size in which every text fits max_width."""
    while size > 6 and max(draw.textlength(t, font=_font(size)) for t in texts) > max_width:
        size -= 1
    return _font(size)


def _object_mask(shape: str, centre, radius: float, rotation: float, image_size: int) -> Image.Image:
    """One world shape (polygons with holes) as an L mask, drawn at 2x and reduced for smooth edges."""
    side = image_size * 2
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cos_r, sin_r = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    cx, cy, r = centre[0] * side, centre[1] * side, radius * side
    for points, fill in SHAPE_POLYGONS[shape]:
        draw.polygon([(cx + r * (x * cos_r - y * sin_r), cy + r * (x * sin_r + y * cos_r)) for x, y in points],
                     fill=fill)
    return mask.reduce(2)


def _filled(mask: Image.Image) -> Image.Image:
    return mask.point(lambda v: 255 if v > 140 else 0)


def _two_objects(rng: random.Random, image_size: int):
    """Shapes, colours, radii, centres and masks of two objects, the larger one >= 2x the other's area."""
    while True:  # few rounds: only a thin large shape beside a compact small one fails the area test
        shapes, colors = rng.sample(SHAPES, 2), rng.sample(PALETTE, 2)
        big = rng.uniform(0.16, 0.21)
        radii = [big, big / rng.uniform(1.6, 2.0)]
        rng.shuffle(radii)
        axis = rng.choice(("horizontal", "vertical"))
        along = [rng.uniform(0.24, 0.32), rng.uniform(0.68, 0.76)]
        rng.shuffle(along)
        across = [rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62)]
        centres = [[round(a, 4), round(b, 4)] if axis == "horizontal" else [round(b, 4), round(a, 4)]
                   for a, b in zip(along, across)]
        masks = [_object_mask(s, c, r, rng.uniform(0, 360), image_size) for s, c, r in zip(shapes, centres, radii)]
        areas = [int((np.asarray(_filled(m)) > 0).sum()) for m in masks]
        larger = radii.index(max(radii))
        if areas[larger] >= 2 * areas[1 - larger]:
            return shapes, colors, [round(r, 4) for r in radii], centres, axis, masks, areas


def _compare_item(rng, seed, split, number, image_size):
    """Two objects of different shape and colour, one clearly larger (radius and area), apart along one axis."""
    (s1, s2), (c1, c2), radii, centres, axis, masks, areas = _two_objects(rng, image_size)
    shade = rng.randint(215, 245)
    image = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    for color, mask in zip((c1, c2), masks):
        image.paste((30, 30, 30), mask=mask.point(lambda v: 255 if v > 0 else 0))  # a thin dark outline
        image.paste(COLORS[color], mask=_filled(mask))
    names = [f"the {c1} {s1}", f"the {c2} {s2}"]
    swapped = [f"the {c1} {s2}", f"the {c2} {s1}"]  # same colours and shapes, wrongly bound
    first_is = {"larger": radii[0] > radii[1], "smaller": radii[0] < radii[1]}
    (x0, y0), (x1, y1) = centres
    if axis == "horizontal":
        first_is |= {"on the left": x0 < x1, "on the right": x0 > x1}
        relation = "to the left of" if x0 < x1 else "to the right of"
    else:
        first_is |= {"at the top": y0 < y1, "at the bottom": y0 > y1}
        relation = "above" if y0 < y1 else "below"
    kind = rng.choice(["which", "which", "relation"])
    if kind == "which":
        property_ = rng.choice(sorted(first_is))
        question = f"Which object is {property_}?"
        correct = names[0] if first_is[property_] else names[1]
        distractors = [n for n in names if n != correct] + swapped
        rng.shuffle(distractors)
    else:
        question = f"Where is {names[0]} relative to {names[1]}?"
        phrases = {"to the left of": "To the left", "to the right of": "To the right", "above": "Above",
                   "below": "Below"}
        correct = phrases[relation]
        distractors = [p for p in phrases.values() if p != correct]
    larger = 0 if radii[0] > radii[1] else 1
    facts = {"shapes": [s1, s2], "colors": [c1, c2], "radii": radii, "areas": areas, "centres": centres,
             "axis": axis, "kind": kind}
    open_qa = [(f"Which object is larger, {names[0]} or {names[1]}?", _sentence(f"{names[larger]} is larger")),
               (f"Where is {names[0]} relative to {names[1]}?", _sentence(f"{names[0]} is {relation} {names[1]}")),
               ("What objects are in the image?", _sentence(f"{_a(c1)} {c1} {s1} and {_a(c2)} {c2} {s2}"))]
    short_qa = [("What color is the larger object?", (c1, c2)[larger]),
                ("What shape is the smaller object?", (s1, s2)[1 - larger]),
                ("How many objects are there?", "2")]
    return image, question, correct, distractors, facts, open_qa, short_qa


def _chart_item(rng, seed, split, number, image_size):
    """A bar chart of 3-4 coloured bars with their values (1-9) printed above them."""
    s = image_size
    colors = rng.sample(PALETTE, rng.choice((3, 4)))
    values = rng.sample(range(1, 10), len(colors))
    image = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(max(8, round(0.2 * s)))
    left, right, base, top = 0.05 * s, 0.95 * s, 0.93 * s, 0.30 * s
    slot = (right - left) / len(colors)
    for i, (color, value) in enumerate(zip(colors, values)):
        x0, x1 = left + slot * (i + 0.14), left + slot * (i + 0.86)
        y = base - (base - top) * value / 9
        draw.rectangle((round(x0), round(y), round(x1), round(base)), fill=COLORS[color], outline=(40, 40, 40))
        draw.text(((x0 + x1) / 2, y - 0.02 * s), str(value), font=font, fill=(0, 0, 0), anchor="md")
    draw.line((0.02 * s, round(base), 0.98 * s, round(base)), fill=(0, 0, 0), width=max(1, s // 64))
    tallest, shortest = colors[values.index(max(values))], colors[values.index(min(values))]
    kind = rng.choice(["tallest", "shortest", "value", "value"])
    if kind in ("tallest", "shortest"):
        question = f"Which bar is the {kind}?"
        correct = tallest if kind == "tallest" else shortest
        distractors = [c for c in colors if c != correct]
        distractors += _pick_others(rng, PALETTE, colors, 3 - len(distractors))
        rng.shuffle(distractors)
    else:
        target = rng.randrange(len(colors))
        question = f"What is the value of the {colors[target]} bar?"
        correct = str(values[target])
        distractors = _fill_numbers(rng, values[target], rng.sample(values, len(values)), 1, 9)
    listing = ", ".join(f"{c} {v}" for c, v in zip(colors, values))
    facts = {"colors": colors, "values": values, "kind": kind}
    open_qa = [("Describe the chart.", f"A bar chart with {NUMBER_WORDS[len(colors)]} bars: {listing}."),
               ("Which bar is the tallest?", f"The {tallest} bar, with a value of {max(values)}.")]
    short_qa = [(f"What is the value of the {c} bar?", str(v)) for c, v in zip(colors, values)]
    short_qa += [("How many bars are in the chart?", str(len(colors))), ("Which bar is the shortest?", shortest)]
    return image, question, correct, distractors, facts, open_qa, short_qa


def _table_item(rng, seed, split, number, image_size):
    """A three-row table of words and two-digit values, ruled, black on white."""
    s = image_size
    words, values = rng.sample(WORDS, 3), rng.sample(range(10, 100), 3)
    image = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin, split_x, rows = 0.03 * s, 0.66 * s, len(words)
    row_h = (s - 2 * margin) / rows
    word_font = _fitted_font(draw, words, round(0.2 * s), split_x - margin - 0.06 * s)
    value_font = _fitted_font(draw, ["88"], round(0.2 * s), s - margin - split_x - 0.06 * s)
    line = max(1, s // 64)
    for i, (word, value) in enumerate(zip(words, values)):
        y_mid = margin + row_h * (i + 0.5)
        draw.text((margin + 0.04 * s, y_mid), word, font=word_font, fill=(0, 0, 0), anchor="lm")
        draw.text(((split_x + s - margin) / 2, y_mid), str(value), font=value_font, fill=(0, 0, 0), anchor="mm")
    for i in range(rows + 1):
        y = round(margin + row_h * i)
        draw.line((margin, y, s - margin, y), fill=(90, 90, 90), width=line)
    for x in (margin, split_x, s - margin):
        draw.line((round(x), margin, round(x), s - margin), fill=(90, 90, 90), width=line)
    kind = rng.choice(["value", "value", "highest", "lowest", "which"])
    target = rng.randrange(rows)
    if kind == "value":
        question, correct = f"What is the value for {words[target]}?", str(values[target])
        distractors = _fill_numbers(rng, values[target], rng.sample(values, rows), 10, 99)
    else:
        if kind == "which":
            question = f"Which item has the value {values[target]}?"
        else:
            question = f"Which item has the {kind} value?"
            target = values.index(max(values) if kind == "highest" else min(values))
        correct = words[target]
        distractors = [w for w in words if w != correct] + _pick_others(rng, WORDS, words, 1)
        rng.shuffle(distractors)
    top = words[values.index(max(values))]
    listing = ", ".join(f"{w} {v}" for w, v in zip(words, values))
    facts = {"words": words, "values": values, "kind": kind}
    open_qa = [("Describe the table.", f"A table with three rows: {listing}."),
               ("Which item has the highest value?", f"{top}, with {max(values)}.")]
    short_qa = [(f"What is the value for {w}?", str(v)) for w, v in zip(words, values)]
    short_qa.append(("Which item is in the first row?", words[0]))
    return image, question, correct, distractors, facts, open_qa, short_qa


BUILDERS = {"synthetic_shape": _shape_item, "synthetic_color": _color_item, "synthetic_count": _count_item,
            "synthetic_compare": _compare_item, "synthetic_word": _word_item, "synthetic_chart": _chart_item,
            "synthetic_table": _table_item}
assert tuple(BUILDERS) == CATEGORIES


def save_example_grid(examples: list[tuple[Image.Image, str]], path, columns: int, zoom: int = 3,
                      text_lines: int = 7) -> None:
    """Images (upscaled `zoom` x, nearest) with a few wrapped lines of text under each, in a grid PNG."""
    cell = examples[0][0].width * zoom
    text_h = text_lines * 12 + 6
    rows = math.ceil(len(examples) / columns)
    sheet = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(examples):
        x, y = 8 + (i % columns) * (cell + 8), 8 + (i // columns) * (cell + text_h + 8)
        sheet.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        lines = [part for line in text.splitlines() for part in textwrap.wrap(line, cell // 5) or [""]][:text_lines]
        draw.multiline_text((x, y + cell + 3), "\n".join(lines), font=_font(10), fill=(0, 0, 0), spacing=2)
    sheet.save(path)

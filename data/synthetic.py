"""Synthetic image-caption world with known generative factors, written as webdataset shards.

Every sample is a pure function of (seed, split, index): factors are drawn first, the image
is rendered from the factors alone, and an alt-text-like caption is drawn from a separate
random stream. Shards mimic DataComp's img2dataset output ({key}.jpg / .json / .txt).

    python -m data.synthetic --out data_cache/synth --samples 2000
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import sys
import tarfile
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

FORMAT_VERSION = 1
SPLITS = ("train", "val")

SHAPES = ("circle", "oval", "square", "triangle", "pentagon", "hexagon", "star", "diamond",
          "cross", "heart", "crescent", "ring", "arrow", "bolt")
WORDS = ("apple", "bread", "candy", "chair", "cloud", "dream", "fish", "glass", "grape", "horse",
         "house", "king", "lemon", "light", "money", "mouse", "music", "ocean", "paper", "pizza",
         "plant", "river", "robot", "smile", "stone", "tiger", "train", "water")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 30),
    "green": (40, 170, 60), "cyan": (40, 200, 220), "blue": (40, 80, 220),
    "purple": (140, 60, 200), "pink": (245, 110, 180), "brown": (140, 85, 40),
    "black": (20, 20, 20), "white": (245, 245, 245),
}
STYLES = ("plain", "stripes", "checker", "dots", "gradient", "noise")
SIZES: dict[str, tuple[float, float]] = {  # object radius as a fraction of the image side
    "small": (0.10, 0.14), "medium": (0.15, 0.20), "large": (0.21, 0.27),
}
COUNTS = (1, 2, 3)
SEMANTIC_FACTORS = ("shape", "word", "count")
LOW_LEVEL_FACTORS = ("color", "style", "size", "position", "rotation")
FACTORS = {"semantic": SEMANTIC_FACTORS, "low_level": LOW_LEVEL_FACTORS}

DEFAULT_WORD_PROB = 0.7
DEFAULT_COLOR_PROB = 0.3
DEFAULT_STYLE_PROB = 0.1
WORD_CAPTION_PROB = 0.8  # chance that a caption quotes the rendered word
COUNT_CAPTION_PROB = 0.6  # chance that a caption spells out a count > 1
CAPITALIZE_PROB = 0.25

CAPTION_TEMPLATES = ("{obj}", "photo of {obj}", "a picture of {obj}", "clipart of {obj}",
                     "illustration of {obj}", "{obj}, vector art", "stock image: {obj}",
                     "drawing of {obj}")
WORD_PHRASES = (' with the word "{w}"', ' with the text "{w}"', ' labeled "{w}"',
                ' and the word "{w}"', ' next to the word "{w}"')
STYLE_PHRASES = {"plain": "plain", "stripes": "striped", "checker": "checkered",
                 "dots": "polka dot", "gradient": "gradient", "noise": "noisy"}
COUNT_WORDS = {2: "two", 3: "three"}
PLURALS = {"cross": "crosses"}

SUPERSAMPLE = 2  # render at 2x and downsample for anti-aliased edges


@dataclass(frozen=True)
class WorldSpec:
    """How hard the world is to see. The defaults are the original world (format 1); `world.json` records the
    spec, and every sample is a pure function of (seed, split, index, spec). docs/data.md explains each knob."""
    object_scale: float = 1.0  # multiplies SIZES' radius ranges (the size classes keep their order)
    max_count: int = 3  # objects per image drawn from 1..max_count
    styles: tuple[str, ...] = STYLES  # background styles drawn from: fewer = less clutter
    max_rotation: float = 360.0  # rotation drawn from U(0, max_rotation) degrees
    font_scale: float = 0.2  # the word's font size as a fraction of the image side (shrunk to fit the width)
    min_glyph_px: float = 4.0  # the smallest font size, in output pixels, a word may be shrunk to (else an error)

    def __post_init__(self):
        checks = [(0.2 <= self.object_scale and SIZES["large"][1] * self.object_scale <= 0.45,
                   f"object_scale must keep the largest radius within 0.45 of the side, got {self.object_scale}"),
                  (self.max_count in COUNTS, f"max_count must be one of {COUNTS}, got {self.max_count}"),
                  (bool(self.styles) and set(self.styles) <= set(STYLES),
                   f"styles must be a non-empty subset of {STYLES}, got {self.styles}"),
                  (0.0 <= self.max_rotation <= 360.0, f"max_rotation must be in [0, 360], got {self.max_rotation}"),
                  (0.05 <= self.font_scale <= 0.5, f"font_scale must be in [0.05, 0.5], got {self.font_scale}"),
                  (self.min_glyph_px > 0, f"min_glyph_px must be > 0, got {self.min_glyph_px}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "styles", tuple(self.styles))

    def size_range(self, size: str) -> tuple[float, float]:
        low, high = SIZES[size]
        return low * self.object_scale, high * self.object_scale

    def to_json(self) -> dict:
        return {**self.__dict__, "styles": list(self.styles)}

    @classmethod
    def from_json(cls, record: dict | None) -> "WorldSpec":
        return cls(**{**(record or {}), "styles": tuple((record or {}).get("styles", STYLES))})


DEFAULT_SPEC = WorldSpec()


# ----------------------------------------------------------------------------- factors

def sample_factors(rng: random.Random, word_prob: float = DEFAULT_WORD_PROB, spec: WorldSpec = DEFAULT_SPEC) -> dict:
    """Draw one factor dict; every value is JSON-serialisable and already rounded."""
    size = rng.choice(tuple(SIZES))
    scale = round(rng.uniform(*spec.size_range(size)), 3)
    count = rng.choice(COUNTS[: spec.max_count])
    position, *others = _sample_positions(rng, scale, count)
    lightness = rng.uniform(30, 225)
    background = [_clip(lightness + rng.uniform(-25, 25)) for _ in range(3)]
    delta = rng.uniform(35, 70) * (-1 if lightness > 127 else 1)
    has_word = rng.random() < word_prob
    return {
        "shape": rng.choice(SHAPES), "word": rng.choice(WORDS) if has_word else None, "count": count,
        "color": rng.choice(tuple(COLORS)), "style": rng.choice(spec.styles), "size": size, "scale": scale,
        "position": position, "other_positions": others, "rotation": round(rng.uniform(0, spec.max_rotation), 1),
        "background": background, "background_alt": [_clip(c + delta) for c in background],
        "word_position": [round(rng.uniform(0.3, 0.7), 4), round(rng.uniform(0.15, 0.85), 4)],
        "render_seed": rng.getrandbits(32),
    }


def vary_factor(factors: dict, factor: str, rng: random.Random, spec: WorldSpec = DEFAULT_SPEC) -> dict:
    """Copy of `factors` with one factor changed; dependent fields (e.g. size -> scale) follow,
    everything else (render_seed included) is kept, so the pair differs in that factor only."""
    out = json.loads(json.dumps(factors))
    if factor in ("shape", "color", "style"):
        vocab = {"shape": SHAPES, "color": tuple(COLORS), "style": spec.styles if len(spec.styles) > 1 else STYLES}[factor]
        out[factor] = rng.choice([v for v in vocab if v != factors[factor]])
    elif factor == "word":
        out["word"] = rng.choice([w for w in (*WORDS, None) if w != factors["word"]])
    elif factor == "count":
        out["count"] = rng.choice([c for c in COUNTS[: max(spec.max_count, 2)] if c != factors["count"]])
        _, *out["other_positions"] = _sample_positions(rng, out["scale"], out["count"], out["position"])
    elif factor == "size":
        out["size"] = rng.choice([s for s in SIZES if s != factors["size"]])
        out["scale"] = round(rng.uniform(*spec.size_range(out["size"])), 3)
        limit = (out["scale"], 1 - out["scale"])
        out["position"], *out["other_positions"] = [
            [round(min(max(v, limit[0]), limit[1]), 4) for v in p]
            for p in [out["position"], *out["other_positions"]]]
    elif factor == "position":
        out["position"], *out["other_positions"] = _sample_positions(rng, out["scale"], out["count"])
    elif factor == "rotation":
        out["rotation"] = round((factors["rotation"] + rng.uniform(30, 330)) % 360, 1)  # may leave max_rotation
    else:
        raise ValueError(f"unknown factor {factor!r}; expected one of {SEMANTIC_FACTORS + LOW_LEVEL_FACTORS}")
    return out


def _sample_positions(rng: random.Random, scale: float, count: int,
                      first: list[float] | None = None) -> list[list[float]]:
    """Object centres (normalised) inside the image, spread apart when possible."""
    positions = [first] if first is not None else []
    while len(positions) < count:  # best of 50 candidates, stopping early once far enough apart
        best, best_gap = None, -1.0
        for _ in range(50):
            candidate = [round(rng.uniform(scale, 1 - scale), 4) for _ in range(2)]
            gap = min((math.dist(candidate, p) for p in positions), default=math.inf)
            if gap > best_gap:
                best, best_gap = candidate, gap
            if gap >= 1.8 * scale:
                break
        positions.append(best)
    return positions


def _clip(value: float) -> int:
    return int(min(max(round(value), 0), 255))


# ----------------------------------------------------------------------------- rendering

def render_image(factors: dict, image_size: int, spec: WorldSpec = DEFAULT_SPEC) -> Image.Image:
    """Render the RGB image described by `factors` (deterministic; randomness via render_seed)."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    canvas = SUPERSAMPLE * image_size
    image = _background(factors["style"], factors["background"], factors["background_alt"],
                        image_size, int(factors["render_seed"]))
    centres = [factors["position"], *factors["other_positions"]][: factors["count"]]
    if len(centres) < factors["count"]:
        raise ValueError(f"count={factors['count']} needs {factors['count'] - 1} other_positions")
    mask = Image.new("L", (canvas, canvas), 0)
    for centre in centres:
        mask = ImageChops.lighter(mask, _shape_mask(factors["shape"], centre, factors["scale"],
                                                    factors["rotation"], canvas))
    outline = mask.filter(ImageFilter.MaxFilter(2 * max(1, round(image_size / 64)) + 1))
    color = COLORS[factors["color"]]
    image.paste(_contrast_color(color), mask=outline)
    image.paste(color, mask=mask)
    if factors.get("word"):
        _draw_word(image, factors["word"], factors["word_position"], factors["background"], spec)
    return image.reduce(SUPERSAMPLE)


def _background(style: str, base: list[int], alt: list[int], image_size: int, seed: int) -> Image.Image:
    """Background at the supersampled resolution as an RGB image."""
    rng = random.Random(seed)
    size = SUPERSAMPLE * image_size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = math.radians(rng.uniform(0, 180))
    along = x * math.cos(angle) + y * math.sin(angle)
    base_arr, alt_arr = np.array(base, np.float32), np.array(alt, np.float32)
    if style == "plain":
        weight = np.zeros((size, size), np.float32)
    elif style == "stripes":
        period = size * rng.uniform(0.08, 0.2)
        weight = (np.floor(along / (period / 2)) % 2).astype(np.float32)
    elif style == "checker":
        cell = size * rng.uniform(0.08, 0.18)
        weight = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    elif style == "dots":
        spacing = size * rng.uniform(0.1, 0.18)
        radius = spacing * rng.uniform(0.2, 0.35)
        dx = (x + spacing * rng.random()) % spacing - spacing / 2
        dy = (y + spacing * rng.random()) % spacing - spacing / 2
        weight = (dx * dx + dy * dy < radius * radius).astype(np.float32)
    elif style == "gradient":
        weight = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    elif style == "noise":
        noise = np.random.default_rng(seed).random((image_size, image_size), dtype=np.float32)
        weight = np.kron(noise, np.ones((SUPERSAMPLE, SUPERSAMPLE), np.float32))
    else:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    pixels = base_arr + weight[..., None] * (alt_arr - base_arr)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _regular(n: int, radius: float = 1.0, start_deg: float = -90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * i / n)),
             radius * math.sin(math.radians(start_deg + 360 * i / n))) for i in range(n)]


def _ellipse(rx: float, ry: float, cx: float = 0.0, cy: float = 0.0) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(2 * math.pi * i / 64), cy + ry * math.sin(2 * math.pi * i / 64))
            for i in range(64)]


def _heart(points: int = 64) -> list[tuple[float, float]]:
    ts = [2 * math.pi * i / points for i in range(points)]
    return [(16 * math.sin(t) ** 3 / 16.5,
             (2.5 - 13 * math.cos(t) + 5 * math.cos(2 * t) + 2 * math.cos(3 * t) + math.cos(4 * t)) / 16.5)
            for t in ts]


# Unit-radius polygons (y down) per shape, each with fill 255 (solid) or 0 (hole).
SHAPE_POLYGONS: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "circle": [(_ellipse(1, 1), 255)],
    "oval": [(_ellipse(1, 0.6), 255)],
    "square": [(_regular(4, 1.15, 45), 255)],
    "triangle": [([(x, y + 0.2) for x, y in _regular(3, 1.1)], 255)],
    "pentagon": [(_regular(5), 255)],
    "hexagon": [(_regular(6, 1.0, 0), 255)],
    "star": [([(r * x, r * y) for (x, y), r in zip(_regular(10), [1.0, 0.42] * 5)], 255)],
    "diamond": [([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], 255)],
    "cross": [([(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3),
                (0.3, 0.95), (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3)], 255)],
    "heart": [(_heart(), 255)],
    "crescent": [(_ellipse(1, 1), 255), (_ellipse(0.85, 0.85, 0.45, -0.15), 0)],
    "ring": [(_ellipse(1, 1), 255), (_ellipse(0.55, 0.55), 0)],
    "arrow": [([(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)], 255)],
    "bolt": [([(0.2, -1.0), (-0.5, 0.15), (-0.05, 0.15), (-0.25, 1.0), (0.5, -0.2), (0.05, -0.2),
               (0.35, -1.0)], 255)],
}
assert tuple(SHAPE_POLYGONS) == SHAPES


def _shape_mask(shape: str, centre: list[float], scale: float, rotation: float, canvas: int) -> Image.Image:
    """One object as an L mask on the supersampled canvas."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    cos_r, sin_r = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    radius, cx, cy = scale * canvas, centre[0] * canvas, centre[1] * canvas
    if shape not in SHAPE_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    for points, fill in SHAPE_POLYGONS[shape]:
        draw.polygon([(cx + radius * (px * cos_r - py * sin_r), cy + radius * (px * sin_r + py * cos_r))
                      for px, py in points], fill=fill)
    return mask


def _luminance(rgb: tuple[int, ...] | list[int]) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255


def _contrast_color(rgb: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    return (30, 30, 30) if _luminance(rgb) > 0.5 else (235, 235, 235)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def word_layout(word: str, position: list[float], canvas: int, spec: WorldSpec = DEFAULT_SPEC
                ) -> tuple[int, int, tuple[int, int], tuple[int, int, int, int]]:
    """(font size, stroke, text origin, drawn box) of `word` on a `canvas`-pixel (supersampled) image.

    The font starts at `spec.font_scale` of the side and shrinks until the word spans at most 90% of the width;
    a word that would need a font below `spec.min_glyph_px` output pixels is an error, not an illegible image.
    The box (left, top, right, bottom, stroke included) lies inside the image with a 3% margin."""
    stroke = max(1, canvas // 48)
    font_size = int(canvas * spec.font_scale)
    floor = math.ceil(spec.min_glyph_px * SUPERSAMPLE)
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    while True:
        left, top, right, bottom = draw.textbbox((0, 0), word, font=_font(font_size), stroke_width=stroke)
        if right - left <= 0.9 * canvas:
            break
        if font_size <= floor:
            raise ValueError(f"the word {word!r} does not fit {canvas // SUPERSAMPLE} px at min_glyph_px="
                             f"{spec.min_glyph_px}: lower font_scale / min_glyph_px or raise the image size")
        font_size -= 1
    if font_size < floor:
        raise ValueError(f"font_scale={spec.font_scale} gives {font_size / SUPERSAMPLE:.1f} px glyphs at "
                         f"{canvas // SUPERSAMPLE} px, below min_glyph_px={spec.min_glyph_px}")
    width, height, margin = right - left, bottom - top, canvas * 0.03
    x = round(min(max(position[0] * canvas - width / 2, margin), canvas - margin - width) - left)
    y = round(min(max(position[1] * canvas - height / 2, margin), canvas - margin - height) - top)
    return font_size, stroke, (x, y), (x + left, y + top, x + right, y + bottom)


def _draw_word(image: Image.Image, word: str, position: list[float], background: list[int],
               spec: WorldSpec = DEFAULT_SPEC) -> None:
    """Draw `word` centred near `position`, kept inside the image, with a contrasting stroke."""
    font_size, stroke, origin, _ = word_layout(word, position, image.width, spec)
    fill = (0, 0, 0) if _luminance(background) > 0.5 else (255, 255, 255)
    ImageDraw.Draw(image).text(origin, word, font=_font(font_size), fill=fill, stroke_width=stroke,
                               stroke_fill=_contrast_color(fill))


# ----------------------------------------------------------------------------- captions

def shape_noun(shape: str, count: int) -> str:
    """Caption noun for a shape, pluralised when count > 1."""
    return shape if count == 1 else PLURALS.get(shape, shape + "s")


def make_caption(factors: dict, rng: random.Random, color_prob: float = DEFAULT_COLOR_PROB,
                 style_prob: float = DEFAULT_STYLE_PROB,
                 word_caption_prob: float = WORD_CAPTION_PROB) -> str:
    """Alt-text-like caption: always names the shape; word, colour and style are optional."""
    count = factors["count"]
    words = [shape_noun(factors["shape"], count)]
    if rng.random() < color_prob:
        words.insert(0, factors["color"])
    if count > 1 and rng.random() < COUNT_CAPTION_PROB:
        words.insert(0, COUNT_WORDS[count])
    elif count == 1:
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    phrase = " ".join(words)
    if factors.get("word") and rng.random() < word_caption_prob:
        phrase += rng.choice(WORD_PHRASES).format(w=factors["word"])
    if rng.random() < style_prob:
        phrase += f" on a {STYLE_PHRASES[factors['style']]} background"
    caption = rng.choice(CAPTION_TEMPLATES).format(obj=phrase)
    if rng.random() < CAPITALIZE_PROB:
        caption = caption[0].upper() + caption[1:]
    return caption


# ----------------------------------------------------------------------------- samples

def _derive(seed: int, split: str, index: int, stream: str) -> bytes:
    return hashlib.sha256(f"clipdino-synthetic:{seed}:{split}:{index}:{stream}".encode()).digest()


def sample_uid(seed: int, split: str, index: int) -> str:
    """Deterministic 32-hex-digit uid, like DataComp's."""
    return _derive(seed, split, index, "uid").hex()[:32]


def make_sample(seed: int, split: str, index: int, image_size: int = 64,
                word_prob: float = DEFAULT_WORD_PROB, color_prob: float = DEFAULT_COLOR_PROB,
                style_prob: float = DEFAULT_STYLE_PROB,
                word_caption_prob: float = WORD_CAPTION_PROB,
                spec: WorldSpec = DEFAULT_SPEC) -> tuple[Image.Image, str, dict]:
    """(image, caption, factors) for one sample; a pure function of the arguments."""
    factor_rng = random.Random(int.from_bytes(_derive(seed, split, index, "factors")[:8], "big"))
    caption_rng = random.Random(int.from_bytes(_derive(seed, split, index, "caption")[:8], "big"))
    factors = sample_factors(factor_rng, word_prob, spec)
    caption = make_caption(factors, caption_rng, color_prob, style_prob, word_caption_prob)
    return render_image(factors, image_size, spec), caption, factors


@dataclass(frozen=True)
class WorldConfig:
    """Everything a worker needs to write one shard."""
    out_dir: str
    seed: int
    image_size: int
    word_prob: float
    color_prob: float
    style_prob: float
    word_caption_prob: float = WORD_CAPTION_PROB
    spec: WorldSpec = DEFAULT_SPEC


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def write_shard(config: WorldConfig, split: str, shard: int, start: int, stop: int) -> tuple[str, int]:
    """Write samples [start, stop) of a split to `{split}-{shard:06d}.tar`; returns (name, count)."""
    name = f"{split}-{shard:06d}.tar"
    final = Path(config.out_dir) / name
    partial = final.with_suffix(".tar.partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            image, caption, factors = make_sample(
                config.seed, split, index, config.image_size, config.word_prob,
                config.color_prob, config.style_prob, config.word_caption_prob, config.spec)
            key = f"{index:09d}"
            record = {**factors, "uid": sample_uid(config.seed, split, index), "caption": caption,
                      "split": split, "index": index, "key": key,
                      "width": image.width, "height": image.height}
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG", quality=90)
            _tar_add(tar, f"{key}.jpg", jpeg.getvalue())
            _tar_add(tar, f"{key}.json", json.dumps(record, sort_keys=True).encode())
            _tar_add(tar, f"{key}.txt", caption.encode())
    os.replace(partial, final)
    return name, stop - start


def _write_shard_job(job: tuple) -> tuple[str, int]:
    return write_shard(*job)


def _validate(samples: int, val_samples: int, shard_size: int, image_size: int,
              workers: int, probabilities: dict[str, float]) -> None:
    checks = [(samples >= 1, f"samples must be >= 1, got {samples}"),
              (val_samples >= 0, f"val_samples must be >= 0, got {val_samples}"),
              (shard_size >= 1, f"shard_size must be >= 1, got {shard_size}"),
              (32 <= image_size <= 1024, f"image_size must be between 32 and 1024, got {image_size}"),
              (workers >= 1, f"workers must be >= 1, got {workers}")]
    checks += [(0.0 <= p <= 1.0, f"{name} must be in [0, 1], got {p}") for name, p in probabilities.items()]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def generate_world(out_dir: str | os.PathLike, samples: int, val_samples: int | None = None,
                   shard_size: int = 1000, seed: int = 0, image_size: int = 64,
                   workers: int | None = None, word_prob: float = DEFAULT_WORD_PROB,
                   color_prob: float = DEFAULT_COLOR_PROB, style_prob: float = DEFAULT_STYLE_PROB,
                   overwrite: bool = False, progress: bool = True, spec: WorldSpec = DEFAULT_SPEC) -> dict:
    """Write train/val shards, sizes.json and world.json into `out_dir`; returns world.json content."""
    val_samples = max(samples // 10, 1) if val_samples is None else val_samples
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    _validate(samples, val_samples, shard_size, image_size, workers,
              {"word_prob": word_prob, "color_prob": color_prob, "style_prob": style_prob})
    out = Path(out_dir)
    ours = [*out.glob("train-*.tar"), *out.glob("val-*.tar"), *out.glob("*.tar.partial"),
            *[out / n for n in ("sizes.json", "world.json") if (out / n).exists()]]
    if (ours or any(out.glob("*.tar"))) and not overwrite:
        raise FileExistsError(f"{out} already contains shards; pass overwrite=True (--overwrite) to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for path in ours:
        path.unlink()

    for word in WORDS:  # an illegible word is a configuration error: say so before writing anything
        word_layout(word, [0.5, 0.5], SUPERSAMPLE * image_size, spec)
    config = WorldConfig(str(out), seed, image_size, word_prob, color_prob, style_prob, spec=spec)
    jobs = [(config, split, shard, start, min(start + shard_size, total))
            for split, total in (("train", samples), ("val", val_samples))
            for shard, start in enumerate(range(0, total, shard_size))]
    sizes: dict[str, int] = {}
    parallel = workers > 1 and len(jobs) > 1
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) if parallel else nullcontext()
    with pool, tqdm(total=samples + val_samples, unit="img", desc="synthetic world", disable=not progress) as bar:
        results = pool.imap_unordered(_write_shard_job, jobs) if parallel else map(_write_shard_job, jobs)
        for name, count in results:
            sizes[name] = count
            bar.update(count)
    sizes = dict(sorted(sizes.items()))
    world = {
        "format_version": FORMAT_VERSION, "generator": "data.synthetic", "seed": seed,
        "image_size": image_size, "samples": {"train": samples, "val": val_samples},
        "shard_size": shard_size, "factors": FACTORS, "spec": spec.to_json(),
        "shards": {split: [n for n in sizes if n.startswith(split + "-")] for split in SPLITS},
        "vocabularies": {"shapes": list(SHAPES), "words": list(WORDS), "styles": list(STYLES),
                         "colors": {k: list(v) for k, v in COLORS.items()}, "counts": list(COUNTS),
                         "sizes": {k: list(v) for k, v in SIZES.items()}},
        "probabilities": {"word": word_prob, "caption_color": color_prob, "caption_style": style_prob,
                          "caption_word": WORD_CAPTION_PROB, "caption_count": COUNT_CAPTION_PROB},
    }
    (out / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
    (out / "world.json").write_text(json.dumps(world, indent=2, sort_keys=True) + "\n")
    return world


# ----------------------------------------------------------------------------- CLI

class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as a single line on stderr (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(f"{self.prog}: error: {message}")


def main(argv: list[str] | None = None) -> dict:
    parser = _OneLineParser(prog="python -m data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory for shards")
    parser.add_argument("--samples", type=int, required=True, help="number of training samples")
    parser.add_argument("--val-samples", type=int, default=None, help="validation samples (default: samples//10, >= 1)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(4, cpus))")
    parser.add_argument("--word-prob", type=float, default=DEFAULT_WORD_PROB, help="chance an image shows a word")
    parser.add_argument("--caption-color-prob", type=float, default=DEFAULT_COLOR_PROB)
    parser.add_argument("--caption-style-prob", type=float, default=DEFAULT_STYLE_PROB)
    defaults = WorldSpec()
    parser.add_argument("--object-scale", type=float, default=defaults.object_scale, help="object radius multiplier")
    parser.add_argument("--max-count", type=int, default=defaults.max_count, help="objects per image: 1..N")
    parser.add_argument("--styles", default=",".join(defaults.styles), help="background styles drawn from")
    parser.add_argument("--max-rotation", type=float, default=defaults.max_rotation, help="degrees")
    parser.add_argument("--font-scale", type=float, default=defaults.font_scale, help="word font size / side")
    parser.add_argument("--min-glyph-px", type=float, default=defaults.min_glyph_px,
                        help="smallest font size in output pixels (a word needing less is an error)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    args = parser.parse_args(argv)
    try:
        spec = WorldSpec(args.object_scale, args.max_count, tuple(s for s in args.styles.split(",") if s),
                         args.max_rotation, args.font_scale, args.min_glyph_px)
        world = generate_world(args.out, args.samples, args.val_samples, args.shard_size, args.seed,
                               args.image_size, args.workers, args.word_prob, args.caption_color_prob,
                               args.caption_style_prob, overwrite=args.overwrite,
                               progress=sys.stderr.isatty(), spec=spec)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"{parser.prog}: error: {error}") from None
    print(f"wrote {world['samples']['train']} train + {world['samples']['val']} val samples "
          f"to {args.out}", file=sys.stderr)
    return world


if __name__ == "__main__":
    main()

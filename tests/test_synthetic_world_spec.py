"""The synthetic world's difficulty knobs (data.synthetic.WorldSpec): legible words, ranges, defaults, records."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from data import synthetic as syn
from train.config_loader import load_config


def _tiny_spec():
    cfg = load_config("launch/configs/pretrain/tiny_clip.yaml")
    from data.prepare import world_spec_from

    return world_spec_from(cfg.data), cfg.data.synthetic_image_size


@pytest.mark.parametrize("where", [[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.0, 1.0]])
def test_every_word_is_drawn_inside_the_image_at_the_minimum_glyph_height(where):
    spec, size = _tiny_spec()
    canvas = syn.SUPERSAMPLE * size
    for word in syn.WORDS:
        font_size, stroke, origin, box = syn.word_layout(word, where, canvas, spec)
        assert font_size / syn.SUPERSAMPLE >= spec.min_glyph_px, word
        left, top, right, bottom = box
        assert 0 <= left and 0 <= top and right <= canvas and bottom <= canvas, (word, box)
        # the pixels actually drawn stay inside that box (so inside the image)
        image = Image.new("RGB", (canvas, canvas), (128, 128, 128))
        syn._draw_word(image, word, where, [128, 128, 128], spec)
        ys, xs = np.nonzero(np.abs(np.asarray(image, np.int16) - 128).sum(-1))
        assert len(xs) and xs.min() >= left - 1 and xs.max() <= right and ys.min() >= top - 1 and ys.max() <= bottom


def test_a_word_that_cannot_be_legible_is_an_error_not_a_smudge(tmp_path):
    with pytest.raises(ValueError, match="min_glyph_px"):
        syn.word_layout("money", [0.5, 0.5], syn.SUPERSAMPLE * 32, syn.WorldSpec(min_glyph_px=12))
    with pytest.raises(ValueError, match="min_glyph_px"):
        syn.generate_world(tmp_path, samples=4, val_samples=1, image_size=32, workers=1, progress=False,
                           spec=syn.WorldSpec(font_scale=0.1, min_glyph_px=6))
    assert not list(tmp_path.glob("*.tar"))  # refused before writing anything


def test_spec_ranges_are_respected():
    spec = syn.WorldSpec(object_scale=1.3, max_count=2, styles=("plain", "gradient"), max_rotation=30)
    rng = random.Random(0)
    for _ in range(300):
        f = syn.sample_factors(rng, spec=spec)
        low, high = spec.size_range(f["size"])
        assert low <= f["scale"] <= high and f["count"] in (1, 2) and f["style"] in spec.styles
        assert 0 <= f["rotation"] <= 30
        varied = syn.vary_factor(f, "size", rng, spec)
        assert spec.size_range(varied["size"])[0] <= varied["scale"] <= spec.size_range(varied["size"])[1]


@pytest.mark.parametrize("bad", [dict(object_scale=2.0), dict(max_count=4), dict(styles=("wavy",)),
                                 dict(max_rotation=400), dict(font_scale=0.9), dict(min_glyph_px=0)])
def test_bad_spec_values_are_refused(bad):
    with pytest.raises(ValueError):
        syn.WorldSpec(**bad)


def test_default_spec_keeps_the_original_world_and_world_json_records_the_spec(tmp_path):
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert syn.sample_factors(rng_a) == syn.sample_factors(rng_b, spec=syn.WorldSpec())
    spec = syn.WorldSpec(object_scale=1.2, max_rotation=45)
    syn.generate_world(tmp_path, samples=3, val_samples=1, image_size=32, workers=1, progress=False, spec=spec)
    record = json.loads((tmp_path / "world.json").read_text())["spec"]
    assert syn.WorldSpec.from_json(record) == spec

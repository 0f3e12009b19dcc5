"""Synthetic world: determinism, shard format, factor coverage, caption statistics, CLI."""
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from data import synthetic as syn

SMALL = dict(samples=200, val_samples=20, shard_size=50, image_size=32)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    syn.generate_world(out, seed=0, workers=2, progress=False, **SMALL)
    return out


def _shard_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def _random_factors(n: int, seed: int = 0, word_prob: float = syn.DEFAULT_WORD_PROB) -> list[dict]:
    rng = random.Random(seed)
    return [syn.sample_factors(rng, word_prob) for _ in range(n)]


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.synthetic", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_same_seed_gives_byte_identical_shards_for_any_worker_count(world_dir, tmp_path):
    syn.generate_world(tmp_path, seed=0, workers=1, progress=False, **SMALL)
    assert _shard_bytes(tmp_path) == _shard_bytes(world_dir)
    for name in ("sizes.json", "world.json"):
        assert (tmp_path / name).read_bytes() == (world_dir / name).read_bytes()


def test_different_seed_gives_different_shards(world_dir, tmp_path):
    syn.generate_world(tmp_path, seed=1, workers=1, progress=False, **SMALL)
    first, other = _shard_bytes(world_dir), _shard_bytes(tmp_path)
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_layout_sizes_and_world_metadata(world_dir):
    names = sorted(p.name for p in world_dir.glob("*.tar"))
    assert names == [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar"]
    assert json.loads((world_dir / "sizes.json").read_text()) == {**{n: 50 for n in names[:4]}, "val-000000.tar": 20}
    world = json.loads((world_dir / "world.json").read_text())
    assert world["seed"] == 0 and world["image_size"] == 32
    assert world["samples"] == {"train": 200, "val": 20}
    assert world["vocabularies"]["shapes"] == list(syn.SHAPES)
    assert set(world["vocabularies"]["colors"]) == set(syn.COLORS)
    assert world["probabilities"]["caption_color"] == syn.DEFAULT_COLOR_PROB
    assert not list(world_dir.glob("*.partial"))


def test_shards_read_with_webdataset(world_dir):
    dataset = wds.WebDataset(str(world_dir / "train-{000000..000003}.tar"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == 200
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(200)]
    uids = set()
    for sample in samples:
        assert {"jpg", "txt", "json"} <= sample.keys()
        assert sample["jpg"].size == (32, 32) and sample["jpg"].mode == "RGB"
        meta = sample["json"]
        assert meta["caption"] == sample["txt"] and meta["split"] == "train"
        assert meta["key"] == sample["__key__"] and meta["index"] == int(sample["__key__"])
        assert re.fullmatch(r"[0-9a-f]{32}", meta["uid"])
        assert syn.shape_noun(meta["shape"], meta["count"]) in sample["txt"].lower()
        uids.add(meta["uid"])
    assert len(uids) == 200


def test_json_factors_reproduce_the_rendered_image(world_dir):
    dataset = wds.WebDataset(str(world_dir / "val-000000.tar"), shardshuffle=False).decode("pil")
    for sample in list(dataset)[:5]:
        meta = sample["json"]
        image, caption, factors = syn.make_sample(0, "val", meta["index"], 32)
        assert caption == sample["txt"]
        assert {k: meta[k] for k in factors} == factors
        assert syn.render_image(meta, 32).tobytes() == image.tobytes()
        decoded = np.asarray(sample["jpg"], dtype=np.float32)
        assert np.abs(decoded - np.asarray(image, dtype=np.float32)).mean() < 12  # JPEG loss only


def test_factor_coverage():
    factors = _random_factors(400)
    for name, vocab in (("shape", syn.SHAPES), ("color", syn.COLORS), ("style", syn.STYLES),
                        ("size", syn.SIZES), ("count", syn.COUNTS)):
        assert {f[name] for f in factors} == set(vocab), name
    assert {f["word"] for f in factors} - {None} <= set(syn.WORDS)
    assert len({f["word"] for f in factors}) > len(syn.WORDS) * 0.8
    assert 0.6 < np.mean([f["word"] is not None for f in factors]) < 0.8
    for f in factors:
        low, high = syn.SIZES[f["size"]]
        assert low <= f["scale"] <= high and 0 <= f["rotation"] <= 360
        assert len(f["other_positions"]) == f["count"] - 1
        assert all(f["scale"] <= v <= 1 - f["scale"] for p in [f["position"], *f["other_positions"]] for v in p)
    assert len(syn.SHAPES) >= 12 and len(syn.WORDS) >= 24 and len(syn.COLORS) >= 8 and len(syn.STYLES) >= 5


def test_caption_statistics():
    rng = random.Random(0)
    factors = _random_factors(4000, seed=1)
    captions = [syn.make_caption(f, rng, 0.3, 0.1, 0.8) for f in factors]
    color_rate = np.mean([re.search(rf"\b{f['color']}\b", c.lower()) is not None for f, c in zip(factors, captions)])
    style_rate = np.mean([f" {syn.STYLE_PHRASES[f['style']]} background" in c.lower()
                          for f, c in zip(factors, captions)])
    with_word = [(f, c) for f, c in zip(factors, captions) if f["word"]]
    word_rate = np.mean([f'"{f["word"]}"' in c for f, c in with_word])
    assert abs(color_rate - 0.3) < 0.035 and abs(style_rate - 0.1) < 0.025 and abs(word_rate - 0.8) < 0.035
    for f, c in zip(factors, captions):
        assert syn.shape_noun(f["shape"], f["count"]) in c.lower()
        other_colors = set(syn.COLORS) - {f["color"]}
        assert not any(re.search(rf"\b{name}\b", c.lower()) for name in other_colors)
    assert len({re.sub(r'"[a-z]+"', "W", c) for c in captions}) > 300  # varied templates
    never = [syn.make_caption(f, rng, 0.0, 0.0, 0.0) for f in factors[:300]]
    assert not any(f["color"] in c.lower() or '"' in c for f, c in zip(factors, never))


def test_render_image_is_a_pure_function_of_factors():
    for factors in _random_factors(20, seed=2):
        snapshot = json.dumps(factors, sort_keys=True)
        first = syn.render_image(factors, 48)
        second = syn.render_image(json.loads(snapshot), 48)
        assert first.size == (48, 48) and first.mode == "RGB"
        assert first.tobytes() == second.tobytes()
        assert json.dumps(factors, sort_keys=True) == snapshot  # not mutated


def test_changing_only_color_changes_object_pixels_only():
    for factors in _random_factors(5, seed=3):
        factors |= {"color": "red", "style": "noise"}
        base = np.asarray(syn.render_image(factors, 64), dtype=np.int16)
        recolored = np.asarray(syn.render_image(factors | {"color": "blue"}, 64), dtype=np.int16)
        changed = (np.abs(base - recolored).sum(axis=-1) > 0).sum()
        object_area = factors["count"] * np.pi * (factors["scale"] * 64 + 2) ** 2  # radius + outline
        assert 0 < changed <= object_area


@pytest.mark.parametrize("factor", syn.SEMANTIC_FACTORS + syn.LOW_LEVEL_FACTORS)
def test_vary_factor_changes_one_factor(factor):
    rng = random.Random(4)
    dependent = {"size": {"scale", "position", "other_positions"}, "count": {"other_positions"},
                 "position": {"other_positions"}}
    for factors in _random_factors(10, seed=5):
        varied = syn.vary_factor(factors, factor, rng)
        assert varied[factor] != factors[factor]
        changed = {k for k in factors if varied[k] != factors[k]}
        assert changed <= {factor} | dependent.get(factor, set())
        assert syn.render_image(varied, 32).size == (32, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(samples=0), "samples"), (dict(samples=5, val_samples=-1), "val_samples"),
    (dict(samples=5, shard_size=0), "shard_size"), (dict(samples=5, image_size=16), "image_size"),
    (dict(samples=5, workers=0), "workers"), (dict(samples=5, color_prob=1.5), "color_prob"),
])
def test_generate_world_rejects_bad_input(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        syn.generate_world(tmp_path, progress=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_refuses_to_overwrite_unless_asked(tmp_path):
    syn.generate_world(tmp_path, 30, 5, shard_size=10, image_size=32, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        syn.generate_world(tmp_path, 10, 5, shard_size=10, image_size=32, workers=1, progress=False)
    syn.generate_world(tmp_path, 10, 5, shard_size=10, image_size=32, workers=1, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_cli_generates_refuses_and_reports_bad_arguments(tmp_path, repo_root):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--samples", "30", "--shard-size", "10", "--image-size", "32", "--workers", "2"]
    done = _cli(*args, cwd=repo_root)
    assert done.returncode == 0, done.stderr
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 33  # 30 train + 3 val

    again = _cli(*args, cwd=repo_root)
    assert again.returncode != 0 and "already contains shards" in again.stderr
    assert _cli(*args, "--overwrite", cwd=repo_root).returncode == 0

    for bad in (["--samples", "0"], ["--samples", "5", "--image-size", "16"], ["--samples", "five"]):
        failed = _cli("--out", str(tmp_path / "bad"), *bad, cwd=repo_root)
        assert failed.returncode != 0
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in failed.stderr, failed.stderr

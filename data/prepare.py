"""Create the embedded default's data on first use: the synthetic world and its tokenizer.

Used by the trainer when `data.generate_synthetic=true` and no shard matches `data.train`;
the same files can be made by hand with `python -m data.synthetic` and `python -m data.tokenizer`.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import braceexpand


def _pattern_matches(pattern: str) -> bool:
    return any(Path(p).is_file() or glob.glob(p) for p in braceexpand.braceexpand(pattern))


def synthetic_folder(pattern: str) -> Path:
    folder = Path(pattern).parent
    if any(c in str(folder) for c in "*?[{"):
        raise ValueError(f"data.generate_synthetic needs a plain folder in data.train, got {pattern!r}")
    return folder


def world_spec_from(d):
    """The WorldSpec that `data.synthetic_*` asks for."""
    from data.synthetic import WorldSpec

    return WorldSpec(d.synthetic_object_scale, d.synthetic_max_count, tuple(d.synthetic_styles),
                     d.synthetic_max_rotation, d.synthetic_font_scale, d.synthetic_min_glyph_px)


def _stale_world(folder: Path, d, spec) -> str:
    """Why the generated world in `folder` is not the one the config asks for ('' = it is, or it is not ours)."""
    record = folder / "world.json"
    if not record.is_file():
        return ""
    world = json.loads(record.read_text())
    if world.get("generator") != "data.synthetic":
        return ""
    wanted = {"samples": {"train": d.synthetic_samples, "val": d.synthetic_val_samples},
              "image_size": d.synthetic_image_size, "spec": spec.to_json(),
              "word_prob": d.synthetic_word_prob}
    found = {"samples": world.get("samples"), "image_size": world.get("image_size"),
             "spec": world.get("spec", _default_spec_json()),
             "word_prob": world.get("probabilities", {}).get("word")}
    return ", ".join(f"{k} {found[k]} != {wanted[k]}" for k in wanted if found[k] != wanted[k])


def _default_spec_json() -> dict:  # worlds written before the spec was recorded are the default world
    from data.synthetic import WorldSpec

    return WorldSpec().to_json()


def ensure_synthetic_data(cfg, log=print) -> None:
    """Generate the world under data.train's folder and train data.tokenizer if either is missing (rank 0 only).

    A world this generator wrote for other settings (samples, size, spec) is regenerated, with its tokenizer."""
    from data.synthetic import generate_world
    from data.tokenizer import read_captions, train_tokenizer
    from data.shards import expand_shards

    d = cfg.data
    folder = synthetic_folder(d.train)
    spec = world_spec_from(d)
    stale = _stale_world(folder, d, spec) if _pattern_matches(d.train) else ""
    if stale:
        log(f"the synthetic world in {folder} was made for other settings ({stale}): regenerating it")
        if d.tokenizer and Path(d.tokenizer).is_file() and Path(d.tokenizer).parent == folder:
            Path(d.tokenizer).unlink()  # trained on the old captions
    if stale or not _pattern_matches(d.train):
        log(f"generating the synthetic world: {d.synthetic_samples} train + {d.synthetic_val_samples} val samples "
            f"at {d.synthetic_image_size} px -> {folder}")
        generate_world(folder, d.synthetic_samples, d.synthetic_val_samples, d.synthetic_shard_size, seed=0,
                       image_size=d.synthetic_image_size, overwrite=True, word_prob=d.synthetic_word_prob,
                       spec=spec)
        if not _pattern_matches(d.train):
            raise ValueError(f"generated the synthetic world in {folder} but data.train={d.train!r} matches none of it")
    if d.tokenizer and not Path(d.tokenizer).is_file():
        if not d.tokenizer.endswith(".model"):
            raise ValueError(f"data.tokenizer must end in .model, got {d.tokenizer!r}")
        log(f"training the caption tokenizer -> {d.tokenizer}")
        Path(d.tokenizer).parent.mkdir(parents=True, exist_ok=True)
        captions = list(read_captions(expand_shards(d.train)))
        train_tokenizer(captions, d.tokenizer[: -len(".model")], d.tokenizer_vocab_size)

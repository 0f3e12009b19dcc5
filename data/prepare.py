"""Create the embedded default's data on first use: the synthetic world and its tokenizer.

Used by the trainer when `data.generate_synthetic=true` and no shard matches `data.train`;
the same files can be made by hand with `python -m data.synthetic` and `python -m data.tokenizer`.
"""
from __future__ import annotations

import glob
from pathlib import Path

import braceexpand


def _pattern_matches(pattern: str) -> bool:
    return any(Path(p).is_file() or glob.glob(p) for p in braceexpand.braceexpand(pattern))


def synthetic_folder(pattern: str) -> Path:
    folder = Path(pattern).parent
    if any(c in str(folder) for c in "*?[{"):
        raise ValueError(f"data.generate_synthetic needs a plain folder in data.train, got {pattern!r}")
    return folder


def ensure_synthetic_data(cfg, log=print) -> None:
    """Generate the world under data.train's folder and train data.tokenizer if either is missing (rank 0 only)."""
    from data.synthetic import generate_world
    from data.tokenizer import read_captions, train_tokenizer
    from data.shards import expand_shards

    d = cfg.data
    folder = synthetic_folder(d.train)
    if not _pattern_matches(d.train):
        log(f"generating the synthetic world: {d.synthetic_samples} train + {d.synthetic_val_samples} val samples "
            f"at {d.synthetic_image_size} px -> {folder}")
        generate_world(folder, d.synthetic_samples, d.synthetic_val_samples, d.synthetic_shard_size, seed=0,
                       image_size=d.synthetic_image_size, overwrite=True)
        if not _pattern_matches(d.train):
            raise ValueError(f"generated the synthetic world in {folder} but data.train={d.train!r} matches none of it")
    if d.tokenizer and not Path(d.tokenizer).is_file():
        if not d.tokenizer.endswith(".model"):
            raise ValueError(f"data.tokenizer must end in .model, got {d.tokenizer!r}")
        log(f"training the caption tokenizer -> {d.tokenizer}")
        Path(d.tokenizer).parent.mkdir(parents=True, exist_ok=True)
        captions = list(read_captions(expand_shards(d.train)))
        train_tokenizer(captions, d.tokenizer[: -len(".model")], d.tokenizer_vocab_size)

"""Evaluation data: a synthetic world folder or labeled image shards, read as (key, image, label, caption, factors).

Two layouts are recognised (see docs/eval.md):
- the synthetic world (`world.json` + `{train,val}-NNNNNN.tar` with `jpg/txt/json`): the label is a factor
  (default `shape`), every factor is known, captions are the `txt`;
- labeled shards (`classes.json` + `{train,val}-NNNNNN.tar` with `jpg/cls/json`, as `python -m data.convert
  imagefolder` writes them): the label is the `cls` integer, class names from `classes.json`, captions from a
  `txt` when the shards have one.
Shards without either file are "unlabeled": only caption retrieval and label-free analysis can run on them.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image

from data.loader import IMAGE_KEYS, pil_to_uint8
from eval.factors import CLASSES, FACTOR_NAMES, factor_labels

SPLITS = ("train", "val")


class EvalDataError(ValueError):
    """A data folder that cannot serve the requested evaluation, explained in one line."""


@dataclass
class EvalData:
    root: Path
    kind: str  # synthetic | labeled | unlabeled
    splits: dict[str, list[Path]]
    label: str = ""  # factor name (synthetic), "class" (labeled), "" (unlabeled)
    classes: Optional[list[str]] = None
    world: Optional[dict[str, Any]] = None
    has_captions: dict[str, bool] = field(default_factory=dict)

    def shards(self, split: str) -> list[Path]:
        if not self.splits.get(split):
            raise EvalDataError(f"{self.root} has no {split}-NNNNNN.tar shards")
        return self.splits[split]

    def fingerprint(self, split: str) -> list[tuple[str, int, int]]:
        """(name, bytes, mtime_ns) of the split's shards: part of the feature-cache key."""
        return [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in self.shards(split)]

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "kind": self.kind, "label": self.label,
                "classes": len(self.classes) if self.classes else 0,
                "shards": {s: len(v) for s, v in self.splits.items()}}


def open_eval_data(folder: str | os.PathLike, label: Optional[str] = None) -> EvalData:
    """Recognise the layout of `folder` (see the module docstring); `label` picks the synthetic factor."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EvalDataError(f"data folder {root} does not exist")
    splits = {s: sorted(root.glob(f"{s}-[0-9]*.tar")) for s in SPLITS}
    if not any(splits.values()):
        raise EvalDataError(f"{root} holds no train-NNNNNN.tar / val-NNNNNN.tar shards")
    has_captions = {s: _has_member(v[0], ".txt") for s, v in splits.items() if v}
    if (root / "world.json").is_file():
        label = label or "shape"
        if label not in FACTOR_NAMES:
            raise EvalDataError(f"unknown label factor {label!r} for the synthetic world; choose from "
                                f"{', '.join(FACTOR_NAMES)}")
        return EvalData(root, "synthetic", splits, label, CLASSES[label], json.loads((root / "world.json").read_text()),
                        has_captions)
    if (root / "classes.json").is_file():
        if label not in (None, "class"):
            raise EvalDataError(f"--label {label!r} applies to the synthetic world; labeled shards use their cls")
        classes = json.loads((root / "classes.json").read_text())
        if not isinstance(classes, list) or not classes:
            raise EvalDataError(f"{root / 'classes.json'} must be a non-empty list of class names")
        return EvalData(root, "labeled", splits, "class", [str(c) for c in classes], None, has_captions)
    if label:
        raise EvalDataError(f"{root} has no labels (no world.json or classes.json) for --label {label!r}")
    return EvalData(root, "unlabeled", splits, "", None, None, has_captions)


def _has_member(shard: Path, suffix: str) -> bool:
    """Whether the first sample of a shard has a member ending in `suffix`."""
    try:
        with tarfile.open(shard) as tar:
            first_key = None
            for member in tar:
                key, _ = _split_name(member.name)
                if first_key is None:
                    first_key = key
                elif key != first_key:
                    return False
                if member.name.endswith(suffix):
                    return True
    except tarfile.TarError as e:
        raise EvalDataError(f"{shard}: unreadable shard ({e})") from None
    return False


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: "dir/0001.seg.jpg" -> key "dir/0001", extension "seg.jpg"."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def iter_samples(shards: list[Path]) -> Iterator[tuple[int, int, dict[str, bytes]]]:
    """(shard index, sample index in shard, {ext: bytes, "__key__": key}) in archive order."""
    for s, shard in enumerate(shards):
        current: dict[str, Any] = {}
        position = 0
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, ext = _split_name(member.name)
                    if not member.isfile() or not ext:
                        continue
                    if current and current["__key__"] != key:
                        yield s, position, current
                        position += 1
                        current = {}
                    current["__key__"] = key
                    current[ext.lower()] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise EvalDataError(f"{shard}: unreadable shard ({e})") from None
        if current:
            yield s, position, current


def _image_bytes(sample: dict[str, bytes]) -> Optional[bytes]:
    """The sample's encoded image (the first of IMAGE_KEYS it has), or None."""
    return next((sample[e] for e in IMAGE_KEYS if e in sample), None)


def decode_sample(sample: dict[str, bytes], data: EvalData) -> dict[str, Any]:
    """Raw sample -> {"key", "image" (3, H, W) uint8, "label", "caption", "factors" (list[int] or None)}."""
    image_bytes = _image_bytes(sample)
    if image_bytes is None:
        raise EvalDataError(f"sample {sample['__key__']!r} has no image ({'/'.join(IMAGE_KEYS)})")
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            image = pil_to_uint8(im)
    except Exception as e:  # PIL raises many types; an evaluation must not silently shrink its test set
        raise EvalDataError(f"sample {sample['__key__']!r} in {data.root}: undecodable image "
                            f"({type(e).__name__})") from None
    caption = sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else ""
    label, factors = -1, None
    if data.kind == "synthetic":
        record = json.loads(sample["json"])
        factors = factor_labels(record)
        label = factors[FACTOR_NAMES.index(data.label)]
    elif data.kind == "labeled":
        if "cls" not in sample:
            raise EvalDataError(f"sample {sample['__key__']!r} in {data.root} has no .cls label")
        label = int(sample["cls"].decode().strip())
        if not 0 <= label < len(data.classes or []):
            raise EvalDataError(f"sample {sample['__key__']!r}: label {label} outside classes.json "
                                f"({len(data.classes or [])} classes)")
    return {"key": sample["__key__"], "image": image, "label": label, "caption": caption, "factors": factors}


def read_records(shards: list[Path]) -> list[dict[str, Any]]:
    """The json records of a split (synthetic factors), in archive order, without decoding images."""
    return [json.loads(sample["json"]) for _, _, sample in iter_samples(shards) if "json" in sample]


def read_images(shards: list[Path], keys: set[str]) -> dict[str, Image.Image]:
    """The images of the given sample keys (for figures), decoded as RGB."""
    found: dict[str, Image.Image] = {}
    for _, _, sample in iter_samples(shards):
        if sample["__key__"] in keys:
            data = _image_bytes(sample)
            if data is not None:
                with Image.open(io.BytesIO(data)) as im:
                    found[sample["__key__"]] = im.convert("RGB")
            if len(found) == len(keys):
                break
    return found

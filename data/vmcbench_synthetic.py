"""A synthetic VMCBench from the world's val split, written in both published layouts.

    OUT/data/dev-00000-of-00001.parquet, OUT/data/test-00000-of-00001.parquet   (Hugging Face)
    OUT/data/tsv/VMCBench_DEV.tsv, OUT/data/tsv/VMCBench_TEST.tsv                (VLMEvalKit)

Columns as suyc21/VMCBench: index, question, A, B, C, D, answer (a letter), category, image.
In parquet `image` is the Hugging Face Image struct {bytes: PNG, path}, with the `datasets`
features in the schema metadata; in the TSVs it is the base64 of the same PNG bytes. Rows go
round the seven categories (data/vlm_scenes.py) so any prefix covers all of them; dev and test
draw disjoint question numbers. Written by `python -m data.vlm_synthetic` (under OUT/vmcbench/).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data.vlm_scenes import CATEGORIES, GROUPS, LETTERS, SceneItem, make_item, save_example_grid

DEFAULT_DEV_QUESTIONS = 280  # 40 per category
DEFAULT_TEST_QUESTIONS = 700  # 100 per category
TEST_FIRST_NUMBER = 1_000_000  # test question numbers start here; dev's start at 0
BENCHMARK_SPLITS = ("dev", "test")
COLUMNS = ("index", "question", *LETTERS, "answer", "category", "image")
SCHEMA = pa.schema(
    [("index", pa.int64())] + [(name, pa.string()) for name in ("question", *LETTERS, "answer", "category")]
    + [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
HF_FEATURES = {
    "index": {"dtype": "int64", "_type": "Value"},
    **{name: {"dtype": "string", "_type": "Value"} for name in ("question", *LETTERS, "answer", "category")},
    "image": {"_type": "Image"},
}


def vmcbench_paths(root: str | os.PathLike) -> dict[str, str]:
    root = Path(root)
    paths = {"vmcbench": root}
    for split in BENCHMARK_SPLITS:
        paths[f"vmcbench_{split}_parquet"] = root / "data" / f"{split}-00000-of-00001.parquet"
        paths[f"vmcbench_{split}_tsv"] = root / "data" / "tsv" / f"VMCBench_{split.upper()}.tsv"
    return {key: str(path) for key, path in paths.items()}


def benchmark_items(seed: int, split: str, questions: int, image_size: int = 64) -> Iterator[SceneItem]:
    """Questions of one benchmark split, round the categories: row r is category r % 7."""
    if split not in BENCHMARK_SPLITS:
        raise ValueError(f"benchmark split must be one of {BENCHMARK_SPLITS}, got {split!r}")
    first = 0 if split == "dev" else TEST_FIRST_NUMBER
    for row in range(questions):
        yield make_item(CATEGORIES[row % len(CATEGORIES)], seed, "val", first + row // len(CATEGORIES), image_size)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(items: Iterator[SceneItem], first_index: int, bar: tqdm) -> list[dict]:
    rows = []
    for offset, item in enumerate(items):
        index = first_index + offset
        rows.append({"index": index, "question": item.question, **dict(zip(LETTERS, item.options)),
                     "answer": item.answer, "category": item.category,
                     "image": {"bytes": png_bytes(item.image), "path": f"{index}.png"}})
        bar.update(1)
    return rows


def _write_parquet(rows: list[dict], path: Path) -> None:
    metadata = {b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()}
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(metadata))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_tsv(rows: list[dict], path: Path) -> None:
    """VLMEvalKit's layout: a header, tab-separated, the image as base64 PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            image = base64.b64encode(row["image"]["bytes"]).decode("ascii")
            writer.writerow([row["index"], row["question"], *(row[letter] for letter in LETTERS),
                             row["answer"], row["category"], image])
    os.replace(tmp, path)


def check_question_counts(dev: int, test: int) -> None:
    for name, count in (("dev", dev), ("test", test)):
        if count < len(CATEGORIES):
            raise ValueError(f"{name} needs at least {len(CATEGORIES)} questions (one per category), got {count}")


def write_vmcbench(root: str | os.PathLike, *, seed: int = 0, dev: int = DEFAULT_DEV_QUESTIONS,
                   test: int = DEFAULT_TEST_QUESTIONS, image_size: int = 64,
                   progress: bool = False) -> dict[str, str]:
    """Write both splits in both layouts under `root`; returns their paths (vmcbench_paths)."""
    check_question_counts(dev, test)
    paths = vmcbench_paths(root)
    Path(paths["vmcbench_dev_tsv"]).parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=dev + test, unit="q", desc="vmcbench", disable=not progress) as bar:
        first_index = 0
        for split, count in (("dev", dev), ("test", test)):
            rows = _rows(benchmark_items(seed, split, count, image_size), first_index, bar)
            _write_parquet(rows, Path(paths[f"vmcbench_{split}_parquet"]))
            _write_tsv(rows, Path(paths[f"vmcbench_{split}_tsv"]))
            first_index += count
    return paths


def save_benchmark_examples(path: str | os.PathLike, seed: int = 0, image_size: int = 64,
                            per_category: int = 4) -> None:
    """A grid PNG: `per_category` dev questions of every category (one row each), answers marked."""
    group_of = {c: g for g, cs in GROUPS.items() for c in cs}
    examples = []
    for category in CATEGORIES:
        for number in range(per_category):
            item = make_item(category, seed, "val", number, image_size)
            options = "  ".join(f"{'*' if letter == item.answer else ''}{letter}. {option}"
                                for letter, option in zip(LETTERS, item.options))
            examples.append((item.image, f"{category} ({group_of[category]})\n{item.question}\n{options}"))
    save_example_grid(examples, path, columns=per_category)

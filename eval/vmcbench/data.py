"""VMCBench questions from the dataset as published: parquet (Hugging Face) or TSV (VLMEvalKit).

    questions = load_questions("/data/VMCBench", split="dev")           # data/dev-*.parquet, else data/tsv/*.tsv
    questions = load_questions("/data/VMCBench/data/tsv/VMCBench_TEST.tsv")  # one file: its rows, split ignored
    image = open_image(questions[0])                                       # PIL RGB, decoded when needed

A folder may be the dataset's root (with `data/`), its `data/` folder, or `data/tsv/`; parquet is preferred
when both layouts are there. Parquet `image` is the Hugging Face Image struct (`bytes`, `path`); TSV `image` is
base64, or (VLMEvalKit's convention for repeated images) the `index` of another row holding the base64.
Every problem is a `VMCBenchDataError` naming the file and the row.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

SPLITS = ("dev", "test")
CHOICES = ("A", "B", "C", "D")
TEXT_COLUMNS = ("index", "question", *CHOICES, "answer", "category")
TSV_REFERENCE_MAX = 64  # VLMEvalKit: an image field this short is the index of the row that holds the image


class VMCBenchDataError(ValueError):
    """Data that cannot be evaluated, explained in one line naming the file (and row)."""


@dataclass(frozen=True)
class Question:
    index: Union[int, str]
    question: str
    options: dict[str, str]  # A-D -> option text
    answer: str  # a letter
    category: str  # the source dataset's name, as the file spells it
    image: Optional[bytes]  # encoded image (None when loaded without images)
    where: str  # "FILE row N" (parquet, from 0) or "FILE line N" (TSV, the header is line 1): for errors


def data_files(data: Union[str, Path], split: str = "dev") -> list[Path]:
    """The file(s) holding `split`: parquet shards first, else the TSV; a file given directly is used as is."""
    if split not in SPLITS:
        raise VMCBenchDataError(f"unknown split {split!r}: VMCBench has {' and '.join(SPLITS)}")
    path = Path(data)
    if path.is_file():
        if path.suffix not in (".parquet", ".tsv"):
            raise VMCBenchDataError(f"{path}: expected a .parquet or .tsv file (or the dataset folder)")
        return [path]
    if not path.is_dir():
        raise VMCBenchDataError(f"VMCBench data {path} does not exist (give the dataset folder, a .parquet or a .tsv)")
    for folder in (path / "data", path):
        shards = sorted(folder.glob(f"{split}-*.parquet"))
        if shards:
            return shards
    for folder in (path / "data" / "tsv", path / "tsv", path):
        tsv = folder / f"VMCBench_{split.upper()}.tsv"
        if tsv.is_file():
            return [tsv]
    raise VMCBenchDataError(f"{path}: no {split} split found (looked for data/{split}-*.parquet and "
                            f"data/tsv/VMCBench_{split.upper()}.tsv)")


def load_questions(data: Union[str, Path], split: str = "dev", limit: Optional[int] = None,
                   with_images: bool = True) -> list[Question]:
    """The split's questions in file order; `limit` keeps that many, evenly spaced through the file."""
    questions: list[Question] = []
    for path in data_files(data, split):
        read = _read_parquet if path.suffix == ".parquet" else _read_tsv
        questions += read(path, with_images)
    if not questions:
        raise VMCBenchDataError(f"{data}: the {split} split has no questions")
    seen: dict[Any, str] = {}
    for q in questions:
        if q.index in seen:
            raise VMCBenchDataError(f"{q.where}: index {q.index} repeats {seen[q.index]}")
        seen[q.index] = q.where
    return questions if limit is None else evenly_spaced(questions, limit)


def evenly_spaced(questions: list[Question], limit: int) -> list[Question]:
    """`limit` questions spread over the file, so that a small subset still spans the source datasets."""
    if limit < 1:
        raise VMCBenchDataError(f"limit must be at least 1, got {limit}")
    return [questions[i * len(questions) // limit] for i in range(limit)] if limit < len(questions) else questions


def open_image(q: Question) -> Image.Image:
    """The question's image as RGB (as lmms-eval's `doc["image"].convert("RGB")`)."""
    if q.image is None:
        raise VMCBenchDataError(f"{q.where}: loaded without images")
    try:
        with Image.open(io.BytesIO(q.image)) as image:
            return image.convert("RGB")
    except Exception as e:
        raise VMCBenchDataError(f"{q.where} (index {q.index}): image cannot be decoded ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------- the two layouts
def _question(row: dict[str, Any], image: Optional[bytes], where: str) -> Question:
    index = row["index"]
    if isinstance(index, str) and index.strip().lstrip("-").isdigit():
        index = int(index)
    if index is None or index == "":
        raise VMCBenchDataError(f"{where}: empty index")
    answer = str(row["answer"] or "").strip()
    if answer not in CHOICES:
        raise VMCBenchDataError(f"{where} (index {index}): answer {row['answer']!r} is not one of A-D")
    category = str(row["category"] or "").strip()
    if not category:
        raise VMCBenchDataError(f"{where} (index {index}): empty category")
    options = {c: "" if row[c] is None else str(row[c]) for c in CHOICES}
    return Question(index, str(row["question"] or ""), options, answer, category, image, where)


def _check_columns(path: Path, present: list[str], with_images: bool) -> None:
    wanted = TEXT_COLUMNS + (("image",) if with_images else ())
    missing = [c for c in wanted if c not in present]
    if missing:
        raise VMCBenchDataError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(present)})")


def _read_parquet(path: Path, with_images: bool) -> list[Question]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        _check_columns(path, schema.names, with_images)
        table = pq.read_table(path, columns=list(TEXT_COLUMNS) + (["image"] if with_images else []))
    except VMCBenchDataError:
        raise
    except Exception as e:
        raise VMCBenchDataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})")
    columns = {name: table.column(name).to_pylist() for name in TEXT_COLUMNS}
    images = table.column("image").to_pylist() if with_images else [None] * table.num_rows
    out = []
    for i in range(table.num_rows):
        where = f"{path} row {i}"
        image = _parquet_image(images[i], path, where) if with_images else None
        out.append(_question({k: v[i] for k, v in columns.items()}, image, where))
    return out


def _parquet_image(value: Any, path: Path, where: str) -> bytes:
    """The Hugging Face Image struct's bytes; a struct holding only a path reads that file (beside the parquet)."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, dict):
        data = value.get("bytes") or b""
        if not data and value.get("path") and (path.parent / value["path"]).is_file():
            data = (path.parent / value["path"]).read_bytes()
    else:
        data = b""
    if not data:
        raise VMCBenchDataError(f"{where}: image has no bytes")
    return _checked_image(data, where)


def _read_tsv(path: Path, with_images: bool) -> list[Question]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            _check_columns(path, list(reader.fieldnames or []), with_images)
            rows = [(reader.line_num, row) for row in reader]  # line_num: the row's (last) line in the file
    except (UnicodeDecodeError, csv.Error) as e:
        raise VMCBenchDataError(f"{path}: not a readable TSV file ({type(e).__name__}: {e})")
    images = {str(r["index"]).strip(): r.get("image") or "" for _, r in rows} if with_images else {}
    out = []
    for line, row in rows:
        where = f"{path} line {line}"
        if None in row.values():
            raise VMCBenchDataError(f"{where}: fewer fields than the header")
        image = _tsv_image(row["image"], images, where) if with_images else None
        out.append(_question(row, image, where))
    return out


def _tsv_image(value: str, images: dict[str, str], where: str) -> bytes:
    value = (value or "").strip()
    if 0 < len(value) <= TSV_REFERENCE_MAX:  # the index of another row that holds this image
        if len(images.get(value, "")) <= TSV_REFERENCE_MAX:
            raise VMCBenchDataError(f"{where}: image {value!r} is neither base64 nor the index of a row with an image")
        value = images[value]
    if not value:
        raise VMCBenchDataError(f"{where}: image is empty")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VMCBenchDataError(f"{where}: image is not valid base64 ({e})")
    return _checked_image(data, where)


def _checked_image(data: bytes, where: str) -> bytes:
    """The bytes, once PIL recognises them as an image (header check; full decoding happens when evaluated)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as e:
        raise VMCBenchDataError(f"{where}: image cannot be decoded ({type(e).__name__}: {e})")
    return data

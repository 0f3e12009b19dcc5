"""Instruction data of the VLM stage: LLaVA's JSON as published, or webdataset shards carrying it.

    records = read_records("playground/llava_v1_5_mix665k.json", image_folder="playground/data")
    records = read_records("shards/stage2-{000000..000009}.tar")   # {key}.json (the record) + {key}.png|jpg

A record is LLaVA's `{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value"}, ...]}`.
Text-only records (no "image") are kept, as in the 665K mix. The file is checked up front (one line naming the
entry for a malformed record); per-sample problems found later (a missing or corrupt image, a conversation the
template cannot tokenise) are skipped, counted by reason and logged, up to `data.max_skipped`.

`ConversationDataset[i]` prepares one sample exactly as inference will: the image through the model's own
`LlavaImageProcessor` (pad to a square with the mean colour, resize, normalise: LLaVA-1.5's `pad`), the text
through data/conversation.py (the template renders the whole conversation, tokenised once, labels from the
template's own segment boundaries).
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from data.shards import DataError, expand_shards

log = logging.getLogger("clipdino.data")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IGNORE_INDEX = -100


@dataclass
class Record:
    id: str
    conversations: list[dict]
    image: Optional[str] = None  # a path under the image folder (JSON) or the member name (shards)
    shard: Optional[tuple[str, int, int]] = None  # (tar path, data offset, size) of the image member


def _check_record(entry: Any, where: str) -> Record:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list) or not entry["conversations"]:
        raise DataError(f"{where}: not a LLaVA record (needs a non-empty 'conversations' list)")
    for turn in entry["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in (
                "human", "gpt", "system"):
            raise DataError(f"{where} (id {entry.get('id')!r}): a turn is not {{'from': 'human'|'gpt', 'value': str}}")
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where} (id {entry.get('id')!r}): 'image' must be one path (multi-image records are not "
                        "LLaVA-1.5 data)")
    return Record(str(entry.get("id", where)), entry["conversations"], image)


def _read_json(path: Path) -> list[Record]:
    try:
        text = path.read_text()
        entries = json.loads(text) if path.suffix != ".jsonl" else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    except OSError as e:
        raise DataError(f"data.train={path}: {e.strerror}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of records (LLaVA's format)")
    return [_check_record(entry, f"{path.name}[{i}]") for i, entry in enumerate(entries)]


def _read_shards(pattern: str) -> list[Record]:
    """Index every shard's members (headers only, plus the small json members): random access by offset."""
    records = []
    for shard in expand_shards(pattern):
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard) as tar:
                for info in tar:
                    base = info.name.rsplit("/", 1)[-1]
                    if info.isfile() and "." in base:  # webdataset keys: the path up to the basename's first dot
                        stem, suffix = base.split(".", 1)
                        key = info.name[: len(info.name) - len(base)] + stem
                        members.setdefault(key, {})["." + suffix.lower()] = info
                jsons = {key: json.loads(tar.extractfile(m[".json"]).read()) for key, m in members.items() if ".json" in m}
        except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
            raise DataError(f"{shard}: unreadable shard ({e}); check it with `python -m data.validate`") from None
        for key, parts in members.items():
            if key not in jsons:
                raise DataError(f"{shard}: sample {key!r} has no .json record")
            record = _check_record(jsons[key], f"{Path(shard).name}:{key}")
            image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
            if record.image is not None and image is None:
                raise DataError(f"{shard}: sample {key!r} names an image but the shard holds none for it")
            if image is not None:
                record.image, record.shard = image.name, (shard, image.offset_data, image.size)
            records.append(record)
    return records


def read_records(spec: str, image_folder: str = "") -> tuple[list[Record], Path]:
    """(records, image root) from a LLaVA JSON / JSONL file or a shard pattern (.tar)."""
    if not spec:
        raise DataError("set data.train (a LLaVA JSON file or webdataset shards)")
    if spec.endswith(".tar") or "{" in spec or "*" in spec:
        return _read_shards(spec), Path(".")
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data.train={spec}: no such file")
    root = Path(image_folder) if image_folder else (path.parent / "images")
    return _read_json(path), root


def modality_lengths(records: list[Record]) -> list[int]:
    """LLaVA's `modality_lengths`: words in the conversation, negative for text-only samples (never 0)."""
    out = []
    for r in records:
        words = max(sum(len(turn["value"].split()) for turn in r.conversations), 1)
        out.append(words if r.image is not None else -words)
    return out


class SkipSample(Exception):
    def __init__(self, reason: str, sample_id: str, detail: str):
        super().__init__(f"{reason}: sample {sample_id}: {detail}")
        self.reason, self.sample_id, self.detail = reason, sample_id, detail


@dataclass
class ConversationDataset(torch.utils.data.Dataset):
    """Map-style: index -> prepared sample (or a skip marker). Picklable for loader workers."""
    records: list[Record]
    image_root: Path
    processor: Any  # LlavaProcessor (its image processor and tokenizer)
    template: Any  # data.conversation.ConversationTemplate
    image_seq_length: int
    max_length: int

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, record: Record) -> Image.Image:
        try:
            if record.shard is not None:
                path, offset, size = record.shard
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(size)
                image = Image.open(io.BytesIO(data))
            else:
                image = Image.open(self.image_root / record.image)
            return image.convert("RGB")
        except FileNotFoundError:
            raise SkipSample("missing_image", record.id, f"{self.image_root / record.image} not found") from None
        except Exception as e:  # PIL raises many types for bad bytes
            raise SkipSample("corrupt_image", record.id, f"{record.image}: {type(e).__name__}: {e}") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        from data.conversation import ConversationError, tokenize_conversation

        record = self.records[index]
        try:
            if record.image is not None:
                pixels = self.processor.image_processor(self._image(record), return_tensors="pt")["pixel_values"][0]
            else:  # text-only: a zero image keeps the tower in every step (ZeRO-3 ranks stay in step), as LLaVA
                size = self.processor.image_processor.crop_size
                pixels = torch.zeros(3, size["height"], size["width"])
            try:
                tokens = tokenize_conversation(self.template, record.conversations, self.processor.tokenizer,
                                               sample_id=record.id, num_images=int(record.image is not None),
                                               image_seq_length=self.image_seq_length, max_length=self.max_length)
            except ConversationError as e:
                raise SkipSample(e.reason, record.id, str(e)) from None
        except SkipSample as e:
            return {"skip": e.reason, "id": record.id, "detail": str(e)}
        return {"id": record.id, "input_ids": tokens["input_ids"], "labels": tokens["labels"], "pixel_values": pixels,
                "has_image": record.image is not None}


@dataclass
class VLMBatch:
    """One rank's micro-batch (right-padded)."""
    ids: list[str]
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX where not supervised
    attention_mask: torch.Tensor  # (B, T) long
    pixel_values: torch.Tensor  # (B, 3, S, S), zeros for text-only samples
    has_image: torch.Tensor  # (B,) bool
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "VLMBatch":
        pixels = self.pixel_values.to(device, non_blocking=True)
        return VLMBatch(self.ids, self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                        self.attention_mask.to(device, non_blocking=True), pixels.to(dtype) if dtype else pixels,
                        self.has_image.to(device, non_blocking=True), self.skipped)


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad the usable samples; skip markers are counted (and logged by the loader)."""
    good = [it for it in items if "skip" not in it]
    skipped: dict[str, int] = {}
    notes = []
    for it in items:
        if "skip" in it:
            skipped[it["skip"]] = skipped.get(it["skip"], 0) + 1
            notes.append(it["detail"])
    if not good:
        return {"empty": True, "skipped": skipped, "notes": notes}
    longest = max(len(it["input_ids"]) for it in good)
    input_ids = torch.full((len(good), longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(good), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(good), longest), dtype=torch.long)
    for row, it in enumerate(good):
        n = len(it["input_ids"])
        input_ids[row, :n], labels[row, :n], attention[row, :n] = it["input_ids"], it["labels"], 1
    return {"ids": [it["id"] for it in good], "input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "pixel_values": torch.stack([it["pixel_values"] for it in good]),
            "has_image": torch.tensor([it["has_image"] for it in good]), "skipped": skipped, "notes": notes}

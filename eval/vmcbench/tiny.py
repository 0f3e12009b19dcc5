"""Tiny stand-ins for tests and smoke runs: a VMCBench folder in both published layouts, a tiny LLaVA folder.

    write_tiny_vmcbench("/tmp/vmc", rows)           # data/dev-00000-of-00001.parquet + data/tsv/VMCBench_DEV.tsv
    write_tiny_llava("/tmp/tiny_llava")             # LlavaForConditionalGeneration + LlavaProcessor, ~0.2M params

The LLaVA folder is what `from_pretrained` loads, built the way a real export is: a tiny Qwen2-style LM
(models.llm), `<image>` and a distinct pad token added, a ChatML chat template, a 2-layer CLIP vision tower at
32 px (patch 8: 16 image tokens), layer -2 features, strategy "default", a square-padding image processor.
"""
from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Any, Sequence, Union

from PIL import Image

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_rows(categories: Sequence[str], answers: str = "ABCD") -> list[dict[str, Any]]:
    """One question per category (answers cycle through `answers`), each with its own small image."""
    rows = []
    for i, category in enumerate(categories):
        rows.append({"index": i, "question": f"What colour is shape {i}?", "A": "red", "B": "green",
                     "C": "blue", "D": f"option {i}", "answer": answers[i % len(answers)], "category": category,
                     "image": png_bytes(((40 * i) % 256, 100, 200))})
    return rows


def write_parquet(path: Union[str, Path], rows: Sequence[dict[str, Any]]) -> Path:
    """Rows as the Hugging Face dataset stores them: `image` a struct of `bytes` and `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "image"}
    images = [{"bytes": r["image"], "path": f"{r['index']}.png"} for r in rows]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({**{k: pa.array(v) for k, v in columns.items()}, "image": pa.array(images, type=image_type)})
    pq.write_table(table, path)
    return path


def write_tsv(path: Union[str, Path], rows: Sequence[dict[str, Any]]) -> Path:
    """Rows as VLMEvalKit's TSV: tab-separated, minimal quoting, `image` base64."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        keys = list(rows[0])
        writer.writerow(keys)
        for r in rows:
            writer.writerow([base64.b64encode(r[k]).decode() if isinstance(r[k], bytes) else r[k] for k in keys])
    return path


def write_tiny_vmcbench(root: Union[str, Path], rows: Sequence[dict[str, Any]], split: str = "dev") -> Path:
    """A dataset folder as published: data/{split}-00000-of-00001.parquet and data/tsv/VMCBench_{SPLIT}.tsv."""
    root = Path(root)
    write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
    write_tsv(root / "data" / "tsv" / f"VMCBench_{split.upper()}.tsv", rows)
    return root


def write_tiny_llava(folder: Union[str, Path], seed: int = 0) -> Path:
    """A random-weight LLaVA folder that `LlavaForConditionalGeneration` / `AutoProcessor` load."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor,
                              LlavaProcessor, Qwen2Config)

    from models.llm import TINY_LLMS, build_tiny_tokenizer

    spec = TINY_LLMS["tiny-qwen2"]
    tokenizer = build_tiny_tokenizer(spec.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<|pad|>"})
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    images = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHATML_TEMPLATE)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

"""Tokenizer for a frozen Hugging Face text tower (picklable: runs inside loader workers)."""
from __future__ import annotations

import torch


class HFTextTokenizer:
    """list[str] -> {"input_ids": (N, L), "attention_mask": (N, L)}, padded to max_length."""

    def __init__(self, folder: str, max_length: int = 77):
        from transformers import AutoTokenizer

        self.folder, self.max_length = str(folder), max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

"""Text side of a CLIP export: the right tokenizer for its text tower, and batched text embeddings.

Tokenizers by export config: our sentencepiece model (`tokenizer_path`), a frozen Hugging Face tower's own
tokenizer (`text.type == "hf_frozen"`), OpenAI's CLIP BPE (`text_tokenizer == "openai-clip-bpe"`, via
open_clip, for open_clip / HF CLIP conversions) or an HF tokenizer folder (`text_tokenizer == "hf:FOLDER"`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Tokenize = Callable[[list[str]], tuple[torch.Tensor, Optional[torch.Tensor]]]  # -> (ids (N, L), mask or None)


class NoTokenizer(RuntimeError):
    """The export has a text tower but no usable tokenizer here (the reason is the message)."""


def tokenizer_for(model: nn.Module, config: dict[str, Any]) -> Tokenize:
    text = config.get("text") or {}
    if text.get("type") == "hf_frozen":
        from data.hf_text_tokenizer import HFTextTokenizer

        hf = HFTextTokenizer(str(model.text.folder), int(text.get("max_length", 77)))
        return lambda texts: (lambda enc: (enc["input_ids"], enc["attention_mask"]))(hf(texts))
    context = int(text.get("context_length", 77))
    if config.get("tokenizer_path"):
        from data.tokenizer import CaptionTokenizer

        spm = CaptionTokenizer(config["tokenizer_path"], context)
        return lambda texts: (spm.encode(texts), None)
    name = config.get("text_tokenizer") or ""
    if name == "openai-clip-bpe":
        try:
            import open_clip
        except ImportError as e:
            raise NoTokenizer("the export uses OpenAI's CLIP BPE tokenizer: pip install open-clip-torch") from e
        return lambda texts: (open_clip.tokenize(texts, context_length=context), None)
    if name.startswith("hf:"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name[3:], local_files_only=True)
        return lambda texts: (tok(list(texts), padding="max_length", truncation=True, max_length=context,
                                  return_tensors="pt")["input_ids"], None)
    raise NoTokenizer("the export records no tokenizer (config tokenizer / text_tokenizer)")


@torch.no_grad()
def encode_texts(model: nn.Module, tokenize: Tokenize, texts: list[str], device: str = "cpu",
                 batch_size: int = 256) -> torch.Tensor:
    """Unit-norm joint-space text embeddings (N, E), float32, on the CPU."""
    model = model.to(device).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(texts[start:start + batch_size])
        emb = model.encode_text(ids.to(device), None if mask is None else mask.to(device), normalize=False)
        out.append(F.normalize(emb.float(), dim=-1).cpu())  # (b, E)
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "embed_dim", 0))

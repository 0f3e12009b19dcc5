"""Image-text retrieval recall@K on paired embeddings (image i belongs with caption i).

Duplicate captions are frequent (alt-text, and the synthetic world: "a star"). With `captions` given, every
pair whose caption string equals the query's is a correct match, in both directions: a text query "a star"
is answered by any image captioned "a star". Without them, ranks count only strictly more similar
candidates, so exact ties (identical caption embeddings) still do not count against the true match.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def ranks_of_true_match(query: torch.Tensor, gallery: torch.Tensor, groups: Optional[torch.Tensor] = None,
                        chunk: int = 2048) -> torch.Tensor:
    """(N,) rank of the best correct gallery item for query[i] (0 = best), cosine similarity: the number of
    wrong items strictly more similar. Correct: gallery[i], or with `groups` (N,) every j with groups[j] == groups[i]."""
    query, gallery = F.normalize(query.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    if groups is None:
        groups = torch.arange(len(query))
    groups = groups.to(query.device)
    ranks = []
    for start in range(0, len(query), chunk):
        sim = query[start:start + chunk] @ gallery.T  # (b, N)
        correct = groups[start:start + chunk, None] == groups[None, :]  # (b, N)
        best_true = sim.masked_fill(~correct, float("-inf")).amax(dim=1)  # (b,)
        ranks.append(((sim > best_true[:, None]) & ~correct).sum(dim=1))
    return torch.cat(ranks)


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """(N,) the same id for identical caption strings (whitespace- and case-insensitive)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(" ".join(c.lower().split()), len(ids)) for c in captions])


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     captions: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Recall@K (%) for image->text and text->image retrieval, plus their mean; `captions` (N strings) makes
    every pair with the same caption a correct match."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"paired embeddings needed, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if captions is not None and len(captions) != len(image_emb):
        raise ValueError(f"{len(captions)} captions for {len(image_emb)} pairs")
    groups = caption_groups(captions) if captions is not None else None
    out: dict[str, float] = {}
    for name, ranks in (("i2t", ranks_of_true_match(image_emb, text_emb, groups)),
                        ("t2i", ranks_of_true_match(text_emb, image_emb, groups))):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    out["pairs"] = float(len(image_emb))
    return out

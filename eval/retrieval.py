"""Image-text retrieval recall@K on paired embeddings (image i belongs with caption i).

Ranks count only strictly more similar candidates, so exact ties (duplicate captions, frequent in alt-text
and in the synthetic world: "a star") do not count against the true match.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def ranks_of_true_match(query: torch.Tensor, gallery: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(N,) rank of gallery[i] for query[i] among all gallery items (0 = best), cosine similarity."""
    query, gallery = F.normalize(query.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    ranks = []
    for start in range(0, len(query), chunk):
        sim = query[start:start + chunk] @ gallery.T  # (b, N)
        rows = torch.arange(len(sim))
        true = sim[rows, rows + start]  # (b,)
        ranks.append((sim > true[:, None]).sum(dim=1))
    return torch.cat(ranks)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
                     ) -> dict[str, float]:
    """Recall@K (%) for image->text and text->image retrieval, plus their mean."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"paired embeddings needed, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    out: dict[str, float] = {}
    for name, ranks in (("i2t", ranks_of_true_match(image_emb, text_emb)),
                        ("t2i", ranks_of_true_match(text_emb, image_emb))):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    out["pairs"] = float(len(image_emb))
    return out

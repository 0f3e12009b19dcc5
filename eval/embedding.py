"""Embedding analysis statistics: what a representation's cosine similarity tracks.

All similarities are cosines of L2-normalised CLS features (as in the authors' analysis code).
- intra- vs inter-class similarity: mean over same-label pairs vs different-label pairs (self-pairs excluded);
- class x class mean similarity matrix (heatmap);
- natural factor similarity (synthetic world): over val pairs, mean similarity of pairs that agree in a
  factor vs pairs that differ in it ("gap" = agree - differ);
- controlled factor sensitivity: pairs rendered from the same factors except one (eval/factors.py); the
  pair similarity s_f is compared to the mean similarity of random val pairs s_rand:
  sensitivity_f = (1 - s_f) / (1 - s_rand) -- 0: changing f alone leaves the embedding unchanged; 1: it
  moves it as far as swapping in a random image. The normalisation makes models with different similarity
  levels (CLIP spaces are wider than DINO's) comparable; the raw s_f is reported too.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def subsample(n: int, limit: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most `limit` of n items (sorted, seeded)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _offdiag(n: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)


def _similarities(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N) cosine similarities of unit-norm rows z and the mask of its off-diagonal (i != j) entries."""
    return z @ z.T, _offdiag(len(z))


def random_pair_similarity(z: torch.Tensor) -> float:
    """Mean cosine similarity over all distinct pairs of unit-norm rows z (N, D)."""
    n = len(z)
    if n < 2:
        return float("nan")
    total = z.sum(0)
    return ((total @ total - (z * z).sum()) / (n * (n - 1))).item()  # sum_{i != j} z_i . z_j / pairs


def intra_inter(z: torch.Tensor, labels: torch.Tensor,
                sims: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, float]:
    """Mean similarity of same-label vs different-label pairs for unit-norm rows z (N, D); `sims`: the
    `_similarities(z)` of a caller that already has them."""
    sim, off = sims if sims is not None else _similarities(z)  # (N, N) each
    same = labels[:, None] == labels[None, :]
    intra, inter = sim[same & off], sim[~same]
    out = {"intra": intra.mean().item() if intra.numel() else float("nan"),
           "inter": inter.mean().item() if inter.numel() else float("nan")}
    out["gap"] = out["intra"] - out["inter"]
    return out


def class_similarity_matrix(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) mean similarity between samples of class a and class b (self-pairs excluded on the diagonal);
    NaN for classes without samples."""
    onehot = F.one_hot(labels, num_classes).float()  # (N, C)
    counts = onehot.sum(0)  # (C,)
    sums = onehot.T @ z  # (C, D) per-class feature sums
    total = sums @ sums.T  # (C, C): sum over pairs (i in a, j in b) of z_i . z_j
    self_sim = onehot.T @ (z * z).sum(1)  # (C,) the i == j terms inside class a
    pairs = counts[:, None] * counts[None, :] - torch.diag(counts)
    total = total - torch.diag(self_sim)
    return torch.where(pairs > 0, total / pairs.clamp_min(1), torch.full_like(total, float("nan")))


def natural_factor_similarity(z: torch.Tensor, factors: torch.Tensor, names: Sequence[str],
                              sims: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                              ) -> dict[str, dict[str, float]]:
    """Per factor: mean similarity of val pairs that agree in it vs pairs that differ in it (`sims` as in
    intra_inter)."""
    sim, off = sims if sims is not None else _similarities(z)  # (N, N) each
    out = {}
    for i, name in enumerate(names):
        same = factors[:, i, None] == factors[None, :, i]
        agree, differ = sim[same & off], sim[~same]
        a = agree.mean().item() if agree.numel() else float("nan")
        d = differ.mean().item() if differ.numel() else float("nan")
        out[name] = {"agree": a, "differ": d, "gap": a - d}
    return out


def controlled_sensitivity(base: torch.Tensor, varied: torch.Tensor, pair_factors: Sequence[str],
                           random_similarity: float) -> dict[str, dict[str, float]]:
    """Per factor, from unit-norm features of base / varied renders (P, D) and the factor each pair changes."""
    sims = (base * varied).sum(-1)  # (P,)
    out = {}
    for name in dict.fromkeys(pair_factors):
        mask = torch.tensor([f == name for f in pair_factors])
        s = sims[mask]
        mean = s.mean().item()
        out[name] = {"similarity": mean, "similarity_std": s.std().item() if len(s) > 1 else 0.0,
                     "sensitivity": (1.0 - mean) / max(1.0 - random_similarity, 1e-6), "pairs": int(mask.sum())}
    return out


def analyse(z: torch.Tensor, labels: Optional[torch.Tensor], num_classes: int, factors: Optional[torch.Tensor] = None,
            factor_names: Sequence[str] = ()) -> dict[str, Any]:
    """Label-level and natural factor statistics of unit-norm features z (N, D) (one model, one split)."""
    rand = random_pair_similarity(z)
    scale = max(1.0 - rand, 1e-6)
    out: dict[str, Any] = {"samples": len(z), "random_pair_similarity": rand}
    with_labels = labels is not None and bool((labels >= 0).all()) and bool(num_classes)
    sims = _similarities(z) if with_labels or factors is not None else None
    if with_labels:
        out["label"] = intra_inter(z, labels, sims)
        out["label"]["gap_normalized"] = out["label"]["gap"] / scale
        out["class_similarity"] = class_similarity_matrix(z, labels, num_classes)
    if factors is not None:
        out["natural"] = natural_factor_similarity(z, factors, factor_names, sims)
        for entry in out["natural"].values():
            entry["gap_normalized"] = entry["gap"] / scale
    return out

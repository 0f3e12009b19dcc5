"""Disagreement pairs between two encoders: image pairs one finds similar and the other does not.

Defaults follow the authors' analysis (model A = the language-supervised one, B = DINO):
"high A, low B" = sim_A > 0.7 and sim_B < 0.5; "high B, low A" = sim_B > 0.8 and sim_A < 0.5, on cosine
similarities of L2-normalised CLS features. Small or young models often have no pair past these absolute
thresholds (their similarities sit in a narrow band), so when a set is empty the top pairs are taken by
relative disagreement instead: the difference of the two similarities after z-scoring each over all pairs
(reported as selection "relative"). The listed top pairs use each image at most once. On the synthetic
world, each set also reports how often its pairs agree
in every factor, against the rate over all pairs: which factors make one model call two images similar.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class Thresholds:
    a_high: float = 0.7  # "high A, low B": sim_A > a_high and sim_B < b_low
    b_low: float = 0.5
    b_high: float = 0.8  # "high B, low A": sim_B > b_high and sim_A < a_low
    a_low: float = 0.5

    @classmethod
    def parse(cls, text: str) -> "Thresholds":
        """"0.7,0.5,0.8,0.5" -> Thresholds (a_high, b_low, b_high, a_low)."""
        parts = [float(x) for x in text.split(",")]
        if len(parts) != 4:
            raise ValueError(f"expected 4 comma-separated thresholds (A high, B low, B high, A low), got {text!r}")
        return cls(*parts)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-8)


def find_disagreements(za: torch.Tensor, zb: torch.Tensor, thresholds: Thresholds = Thresholds(), top: int = 8,
                       factors: Optional[torch.Tensor] = None, factor_names: Sequence[str] = ()) -> dict[str, Any]:
    """Unit-norm features of the same N images under models A and B (N, Da), (N, Db) -> disagreement report.

    Pairs are (i, j) with i < j; "pairs" lists hold (i, j, sim_A, sim_B), most disagreeing first."""
    if len(za) != len(zb):
        raise ValueError(f"the two models saw different images ({len(za)} vs {len(zb)})")
    i, j = torch.triu_indices(len(za), len(za), offset=1)  # (P,) each, P = N (N - 1) / 2
    sa, sb = (za @ za.T)[i, j], (zb @ zb.T)[i, j]  # (P,) each, from the (N, N) Gram matrices
    t = thresholds
    relative = _zscore(sa) - _zscore(sb)  # > 0: A finds the pair relatively more similar than B does
    sets = {"a_high_b_low": ((sa > t.a_high) & (sb < t.b_low), sa - sb, relative),
            "b_high_a_low": ((sb > t.b_high) & (sa < t.a_low), sb - sa, -relative)}
    out: dict[str, Any] = {"pairs_total": len(sa), "thresholds": vars(t),
                           "similarity_correlation": torch.corrcoef(torch.stack([sa, sb]))[0, 1].item(),
                           "mean_similarity": {"a": sa.mean().item(), "b": sb.mean().item()}}
    if factors is not None:
        out["factor_agreement_all_pairs"] = _agreement(factors, i, j, torch.ones_like(sa, dtype=torch.bool),
                                                       factor_names)
    for name, (mask, margin, rel) in sets.items():
        count = int(mask.sum())
        if count:
            score, selection = torch.where(mask, margin, torch.full_like(margin, -float("inf"))), "threshold"
        else:
            score, selection = rel, "relative"
        chosen = _diverse_top(score, i, j, min(top, count) if count else top)
        out[name] = {"count": count, "fraction": count / max(len(sa), 1), "selection": selection,
                     "pairs": [(int(i[k]), int(j[k]), sa[k].item(), sb[k].item()) for k in chosen]}
        if factors is not None:
            pool = mask if count else torch.zeros_like(mask).index_fill_(0, score.topk(min(len(score), max(
                top, len(score) // 100))).indices, True)  # relative: the top 1% of pairs
            out[name]["factor_agreement"] = _agreement(factors, i, j, pool, factor_names)
    return out


def _diverse_top(score: torch.Tensor, i: torch.Tensor, j: torch.Tensor, top: int, pool: int = 20000
                ) -> list[int]:
    """Indices of the `top` best-scoring pairs such that no image appears in two of them (a grid of the same
    image paired with everything says little); looks at the best `pool` pairs."""
    order = score.topk(min(pool, len(score))).indices.tolist()
    used: set[int] = set()
    chosen = []
    for k in order:
        if len(chosen) == top or score[k] == -float("inf"):
            break
        a, b = int(i[k]), int(j[k])
        if a not in used and b not in used:
            chosen.append(k)
            used.update((a, b))
    return chosen


def _agreement(factors: torch.Tensor, i: torch.Tensor, j: torch.Tensor, mask: torch.Tensor,
               names: Sequence[str]) -> dict[str, float]:
    """Fraction of the masked pairs whose two images share each factor's value."""
    same = factors[i[mask]] == factors[j[mask]]  # (p, F)
    rates = same.float().mean(0) if len(same) else torch.full((len(names),), float("nan"))
    return {name: rates[k].item() for k, name in enumerate(names)}

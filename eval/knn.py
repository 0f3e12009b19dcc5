"""Weighted k-nearest-neighbour classification on L2-normalised features, as DINO evaluates (eval_knn.py).

Each test sample takes its k most cosine-similar train samples; neighbour j votes for its class with weight
exp(sim_j / T) (k = 20, T = 0.07 in DINO); the class with the largest summed weight wins.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from eval.linear_probe import accuracy


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 0) -> torch.Tensor:
    """Class scores (M, C) for test features (M, D) given train features (N, D) and labels (N,).

    Test rows go in chunks whose (chunk, N) similarity block stays near 2^28 floats (1 GiB); 0 = automatic."""
    train = F.normalize(train_x.float(), dim=-1)
    test = F.normalize(test_x.float().to(train.device), dim=-1)
    train_y = train_y.to(train.device)
    k = min(k, len(train))
    chunk = chunk or max(1, min(1024, 2**28 // max(len(train), 1)))
    scores = []
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T  # (b, N)
        top_sim, top_idx = sim.topk(k, dim=-1)  # (b, k)
        weights = (top_sim / temperature).exp()  # (b, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], weights)  # (b, C)
        scores.append(votes)
    return torch.cat(scores)


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) of the weighted kNN classifier."""
    scores = knn_predict(train_x, train_y, test_x, num_classes, k, temperature)  # (M, C)
    test_y = test_y.to(scores.device)
    return {"top1": accuracy(scores, test_y, 1), "top5": accuracy(scores, test_y, 5) if num_classes > 5 else None,
            "k": min(k, len(train_x)), "temperature": temperature, "train_samples": len(train_x),
            "val_samples": len(test_x)}

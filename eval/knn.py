"""Weighted k-nearest-neighbour classification on L2-normalised features, as DINO evaluates (eval_knn.py).

Each test sample takes its k most cosine-similar train samples; neighbour j votes for its class with weight
exp(sim_j / T) (k = 20, T = 0.07 in DINO); the class with the largest summed weight wins.

Presets (`KNN_PRESETS`, `--knn-preset`):
- "default": k = 20, T = 0.07 on the run's shared features (bicubic resize of the short side to the crop size
  on the uint8 tensor, CLS after the final LayerNorm);
- "dino": facebookresearch/dino eval_knn.py as written: `Resize(256, interpolation=3)` (PIL bicubic) of the
  short side, `CenterCrop(224)`, ImageNet mean / std; the backbone's output (`VisionTransformer.forward`:
  `self.norm(x)[:, 0]`, the CLS after the final LayerNorm) L2-normalised (`nn.functional.normalize(..., p=2)`);
  `--nb_knn` default k in {10, 20, 100, 200}, `--temperature` 0.07; votes `exp(sim / T)` summed per class
  (`distances.div_(T).exp_()` times one-hot); top-1, and top-5 over min(5, k) predictions. The resize keeps
  DINO's 256 / 224 ratio at other crop sizes. k = 20 is the headline ("20 is usually working the best").
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class KnnPreset:
    ks: tuple[int, ...]
    temperature: float = 0.07
    headline_k: int = 20  # the k whose accuracy is the task's summary "top1"
    resize_ratio: Optional[float] = None  # short side / crop size before the centre crop; None: the run's features
    interpolation: str = "bicubic"
    resize_backend: str = "pil"


KNN_PRESETS: dict[str, KnnPreset] = {
    "default": KnnPreset(ks=(20,)),
    "dino": KnnPreset(ks=(10, 20, 100, 200), resize_ratio=256 / 224),
}


def knn_preset(name: str, k: Optional[int] = None, temperature: Optional[float] = None) -> KnnPreset:
    """A named preset; an explicit k replaces its list of k, an explicit T its temperature."""
    if name not in KNN_PRESETS:
        raise ValueError(f"unknown kNN preset {name!r}; choose from {', '.join(KNN_PRESETS)}")
    p = KNN_PRESETS[name]
    ks = (k,) if k is not None else p.ks
    return KnnPreset(ks, temperature if temperature is not None else p.temperature,
                     k if k is not None else p.headline_k, p.resize_ratio, p.interpolation, p.resize_backend)


def preset_extract(extract: Any, preset: KnnPreset) -> Any:
    """The preset's own ExtractSettings (None: the run's shared features): the crop stays the run's image size,
    the short side is resized to round(crop x ratio) (256 at 224), CLS after the final LayerNorm."""
    if preset.resize_ratio is None:
        return None
    return replace(extract, resize=round(extract.image_size * preset.resize_ratio), interpolation=preset.interpolation,
                   resize_backend=preset.resize_backend, cls_token="final_norm", variant="dino_knn")


def _chunk(chunk: int, n_train: int) -> int:
    """Test rows per (chunk, N) similarity block: near 2^28 floats (1 GiB); 0 = automatic."""
    return chunk or max(1, min(1024, 2**28 // max(n_train, 1)))


@torch.no_grad()
def _votes(sim: torch.Tensor, train_y: torch.Tensor, num_classes: int, ks: Sequence[int], temperature: float
           ) -> dict[int, torch.Tensor]:
    """(b, N) similarities -> {k: (b, C) summed exp(sim / T) votes of the k nearest}."""
    top_sim, top_idx = sim.topk(max(ks), dim=-1)  # (b, kmax), sorted
    weights, labels = (top_sim / temperature).exp(), train_y[top_idx]  # (b, kmax) each
    out = {}
    for k in ks:
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        out[k] = votes.scatter_add_(1, labels[:, :k], weights[:, :k])  # (b, C)
    return out


def _hits(votes: torch.Tensor, truth: torch.Tensor, top: int) -> int:
    """How many rows have their true class among the `top` highest votes; ranked by a descending sort, as DINO's
    `probs.sort(1, True)`, so classes without a vote are ordered the same way there."""
    ranked = votes.sort(dim=-1, descending=True).indices[:, :top]  # (b, top)
    return int((ranked == truth[:, None]).any(dim=-1).sum().item())


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 0) -> torch.Tensor:
    """Class scores (M, C) for test features (M, D) given train features (N, D) and labels (N,)."""
    train = F.normalize(train_x.float(), dim=-1)
    test = F.normalize(test_x.float().to(train.device), dim=-1)
    train_y = train_y.to(train.device)
    k = min(k, len(train))
    chunk = _chunk(chunk, len(train))
    return torch.cat([_votes(test[s:s + chunk] @ train.T, train_y, num_classes, [k], temperature)[k]
                      for s in range(0, len(test), chunk)])


@torch.no_grad()
def knn_accuracies(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, ks: Sequence[int], temperature: float = 0.07, chunk: int = 0
                   ) -> dict[int, dict[str, Optional[float]]]:
    """{k: {"top1", "top5"}} (%) for every k from one pass (the k nearest are the first k of the kmax nearest);
    top-5 (over min(5, k) predictions, as DINO) only beyond five classes. k is capped at the train size."""
    train = F.normalize(train_x.float(), dim=-1)
    test = F.normalize(test_x.float().to(train.device), dim=-1)
    train_y, test_y = train_y.to(train.device), test_y.to(train.device)
    ks = sorted({min(k, len(train)) for k in ks})
    chunk = _chunk(chunk, len(train))
    hits = {k: [0, 0] for k in ks}
    for s in range(0, len(test), chunk):
        truth = test_y[s:s + chunk]
        for k, votes in _votes(test[s:s + chunk] @ train.T, train_y, num_classes, ks, temperature).items():
            hits[k][0] += _hits(votes, truth, 1)
            hits[k][1] += _hits(votes, truth, min(5, k))  # DINO: "top5 does not make sense if k < 5"
    n = max(len(test), 1)
    return {k: {"top1": 100.0 * h1 / n, "top5": 100.0 * h5 / n if num_classes > 5 else None}
            for k, (h1, h5) in hits.items()}


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int | Sequence[int] = 20, temperature: float = 0.07,
                 headline_k: Optional[int] = None) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) of the weighted kNN classifier; with several k, `by_k` holds each and the
    headline (default: the first k) gives top1 / top5 / k."""
    ks = [k] if isinstance(k, int) else list(k)
    by_k = knn_accuracies(train_x, train_y, test_x, test_y, num_classes, ks, temperature)
    head = min(headline_k if headline_k is not None else ks[0], len(train_x))
    result = {**by_k[head], "k": head, "temperature": temperature, "train_samples": len(train_x),
              "val_samples": len(test_x)}
    if len(by_k) > 1:
        result["by_k"] = {str(kk): v for kk, v in by_k.items()}
    return result

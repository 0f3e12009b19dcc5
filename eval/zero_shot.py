"""Zero-shot classification with a CLIP export's text tower: class embedding = mean of its prompt embeddings.

Prompts: on the synthetic world, caption-style templates over the factor's values (eval/factors.py); on
labeled shards, the class names of `classes.json` in the 7-template ensemble OpenAI selected for ImageNet
(CLIP repository, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from eval.linear_probe import accuracy

IMAGENET_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                      "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def class_prompts(class_names: list[str], templates=IMAGENET_TEMPLATES) -> dict[str, list[str]]:
    return {name: [t.format(name.replace("_", " ")) for t in templates] for name in class_names}


def classifier_weights(prompts: dict[str, list[str]], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """(C, E) unit-norm class embeddings, rows in `prompts` order."""
    flat = [p for ps in prompts.values() for p in ps]
    emb = encode(flat)  # (P, E) unit norm
    rows, start = [], 0
    for ps in prompts.values():
        rows.append(F.normalize(emb[start:start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    return torch.stack(rows)


def zero_shot_classify(image_emb: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, Any]:
    """Top-1 / top-5 (%) of argmax cosine(image, class) for (N, E) unit-norm image embeddings."""
    logits = image_emb.float() @ weights.float().T  # (N, C)
    classes = weights.shape[0]
    return {"top1": accuracy(logits, labels, 1), "top5": accuracy(logits, labels, 5) if classes > 5 else None,
            "classes": classes, "val_samples": len(labels)}

"""PNG figures of the evaluation harness (matplotlib, Agg backend: works headless)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval.factors import SEMANTIC  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def factor_bars(values: dict[str, dict[str, float]], title: str, ylabel: str, path: Path,
                reference: Optional[dict[str, float]] = None) -> Path:
    """Grouped bars: one group per factor, one bar per model; semantic factors' labels in bold.

    `reference` (e.g. chance accuracy per factor) is drawn as a black tick over each group."""
    models = list(values)
    factors = list(dict.fromkeys(f for v in values.values() for f in v))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(factors) + 2), 3.8))
    x = np.arange(len(factors))
    for k, model in enumerate(models):
        ax.bar(x + (k - (len(models) - 1) / 2) * width, [values[model].get(f, np.nan) for f in factors], width,
               label=model)
    if reference:
        for xi, f in zip(x, factors):
            if f in reference:
                ax.hlines(reference[f], xi - 0.4, xi + 0.4, colors="black", linewidth=1.5)
    ax.set_xticks(x, factors)
    for tick, f in zip(ax.get_xticklabels(), factors):
        tick.set_fontweight("bold" if f in SEMANTIC else "normal")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def heatmap(matrix: torch.Tensor, labels: Sequence[str], title: str, path: Path) -> Path:
    n = len(labels)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * n, 14), min(1.6 + 0.45 * n, 13)))
    image = ax.imshow(matrix.numpy(), cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="mean cosine similarity")
    return _save(fig, path)


def controlled_heatmaps(images: list, labels: Sequence[str], matrices: dict[str, torch.Tensor], path: Path) -> Path:
    """Thumbnails of a base image and its one-factor variants, then each model's similarity matrix over them
    (one colour scale per model, values printed: models differ in their overall similarity level)."""
    n, models = len(images), list(matrices)
    short = [label.split(":")[0].split(" ")[0] for label in labels]  # "shape: bolt -> oval" -> "shape"
    fig = plt.figure(figsize=(max(1.05 * n, 4.6 * len(models)), 1.3 + 4.4))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 4.4])
    for ax, image, label in zip(top.subplots(1, n), images, labels):
        ax.imshow(image)
        ax.set_title(label.replace(": ", "\n").replace(" -> ", "\n-> "), fontsize=6)
        ax.axis("off")
    for ax, model in zip(np.atleast_1d(bottom.subplots(1, len(models))), models):
        m = matrices[model].numpy()
        digits = 2 if m.min() < 0.95 else 3
        im = ax.imshow(m, cmap="viridis", vmin=float(m.min()), vmax=1.0)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.{digits}f}", ha="center", va="center", fontsize=5,
                    color="black" if v > (m.min() + 1) / 2 else "white")
        ax.set_xticks(range(n), short, rotation=60, fontsize=7, ha="right")
        ax.set_yticks(range(n), short, fontsize=7)
        ax.set_title(f"{model}: cosine similarity", fontsize=9)
        bottom.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def pair_grid(sets: dict[str, list[tuple[Any, Any, str]]], path: Path) -> Path:
    """One panel per set (title -> [(image_i, image_j, caption)]), a pair per row."""
    rows = max(1, max((len(v) for v in sets.values()), default=0))
    fig = plt.figure(figsize=(3.4 * max(len(sets), 1), 1.75 * rows + 0.6))
    for sub, (title, pairs) in zip(np.atleast_1d(fig.subfigures(1, max(len(sets), 1))), sets.items()):
        sub.suptitle(title.replace(" (", "\n("), fontsize=8)
        axes = sub.subplots(rows, 2, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for r, (a, b, caption) in enumerate(pairs):
            axes[r, 0].imshow(a)
            axes[r, 1].imshow(b)
            axes[r, 0].text(0, -0.08, caption, transform=axes[r, 0].transAxes, fontsize=6, va="top")
        if not pairs:
            axes[0, 0].text(0, 0.5, "no pairs", fontsize=8)
    return _save(fig, path)


def metrics_vs_step(rows: list[dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """One small panel per metric: value against training step (rows: {"step", "summary": {...}})."""
    names = sorted({k for r in rows for k, v in (r.get("summary") or {}).items() if isinstance(v, (int, float))})
    if not names:
        return None
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        points = sorted((r["step"], r["summary"][name]) for r in rows
                        if r.get("step") is not None and isinstance((r.get("summary") or {}).get(name), (int, float)))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

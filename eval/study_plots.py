"""PNG figures of the study report: grouped bars with seed error bars, and CLIP - DINO deltas beside the paper's."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_groups(data: dict[str, dict[str, list[float]]], path: Path, ylabel: str, title: str,
               chance: Optional[float] = None) -> Optional[Path]:
    """data: variant -> metric -> values over seeds. One group of bars per metric, one bar per variant (mean, with
    the seeds' std as an error bar when there are several)."""
    metrics = list(dict.fromkeys(m for per in data.values() for m in per))
    variants = [v for v in data if data[v]]
    if not metrics or not variants:
        return None
    plt = _pyplot()
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(metrics) * max(1, len(variants)) * 0.6 + 2), 3.6))
    for k, variant in enumerate(variants):
        xs, means, errs = [], [], []
        for i, metric in enumerate(metrics):
            values = data[variant].get(metric) or []
            if values:
                xs.append(i - 0.4 + width * (k + 0.5))
                means.append(statistics.mean(values))
                errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=3, label=variant)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.1f}")
    return _finish_bars(plt, fig, ax, metrics, ylabel, title, path, tilt=len(metrics) > 4)


def _finish_bars(plt, fig, ax, names: list[str], ylabel: str, title: str, path: Path, tilt: bool) -> Path:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def delta_bars(deltas: dict[str, tuple[float, Optional[float]]], path: Path) -> Path:
    """metric -> (ours, paper or None): CLIP - DINO in points, ours and the paper's side by side."""
    plt = _pyplot()
    names = list(deltas)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [deltas[n][0] for n in names], 0.4, label="ours")
    paper = [(x + 0.2, deltas[n][1]) for x, n in zip(xs, names) if deltas[n][1] is not None]
    if paper:
        ax.bar([p[0] for p in paper], [p[1] for p in paper], 0.4, label="paper")
    ax.axhline(0, color="black", lw=0.8)
    return _finish_bars(plt, fig, ax, names, "CLIP − DINO (points)", "CLIP minus DINO", path, tilt=True)


def loss_curves(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Optional[Path]:
    """panels: title -> run label -> [(step, loss)]; one panel per title (pretraining, VLM stage 1, stage 2)."""
    panels = {t: runs for t, runs in panels.items() if any(runs.values())}
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for label, points in runs.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

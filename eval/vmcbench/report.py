"""The output folder of a VMCBench evaluation: results.json, results.md, predictions.jsonl, groups.png."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from eval.vmcbench.scoring import GROUPS, UNGROUPED, group_of

CHANCE = 25.0  # four options


def write_outputs(out_dir: Path, results: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> None:
    """Predictions, markdown and figure first; results.json last (its presence means the evaluation finished)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    groups_plot(results, out_dir / "groups.png")
    _write_atomic(out_dir / "results.md", render_markdown(results))
    _write_atomic(out_dir / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _f(x: Any) -> str:
    return "—" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def _group_names(scores: dict[str, Any]) -> list[str]:
    return list(GROUPS) + ([UNGROUPED] if UNGROUPED in scores["groups"]["micro"] else [])


def _score_tables(scores: dict[str, Any]) -> list[str]:
    counts = scores["counts"]
    lines = [f"Overall: **{_f(scores['overall'])}** % of {scores['n']} questions.", "",
             "| group | questions | categories | micro % (lmms-eval) | macro % (VLMEvalKit) |", "|---|---|---|---|---|"]
    for g in _group_names(scores):
        n_cat = sum(1 for c in scores["categories"] if group_of(c) == g)
        lines.append(f"| {g} | {counts['groups'][g]} | {n_cat} | {_f(scores['groups']['micro'][g])} | "
                     f"{_f(scores['groups']['macro'][g])} |")
    lines += ["", "| category | group | questions | accuracy % |", "|---|---|---|---|"]
    order = {g: i for i, g in enumerate(_group_names(scores))}
    for c in sorted(scores["categories"], key=lambda c: (order[group_of(c)], c.lower())):
        lines.append(f"| {c} | {group_of(c)} | {counts['categories'][c]} | {_f(scores['categories'][c])} |")
    return lines + [""]


def render_markdown(results: dict[str, Any]) -> str:
    s, d = results["settings"], results["data"]
    lines = [f"# VMCBench: {results['model']['name']}", "",
             f"- model: `{results['model']['source']}`", f"- data: `{d['source']}` ({d['split']}, {d['n']} of "
             f"{d['n_total']} questions" + (f", --limit {d['limit']}: evenly spaced" if d["limit"] else "") + ")",
             f"- mode: {results['mode']}; " + ", ".join(f"{k} {'off' if v is None else v}" for k, v in s.items()),
             f"- time: {results['timing']['total_s']:.1f} s", ""]
    if results["mode"] != "likelihood":
        fallback = (f"; {results['random_fallback']} drawn at random (seed {s['random_fallback']})"
                    if s.get("random_fallback") is not None else "; scored wrong")
        lines += ["## Generation (answer parsed from the response)", "",
                  f"Unparsed responses: {results['unparsed']} of {results['n']}{fallback}.", ""]
        lines += _score_tables(results)
    if "likelihood" in results:
        lines += ["## Option likelihood (highest next-token log-probability among A-D)", ""]
        lines += _score_tables(results["likelihood"])
    lines += ["micro: mean over the group's questions (lmms-eval); macro: mean of the group's categories' "
              "accuracies (VLMEvalKit); overall: mean over all questions (both). See docs for every difference.", ""]
    return "\n".join(lines)


def groups_plot(results: dict[str, Any], path: Path) -> Optional[Path]:
    """Grouped bars per group: micro vs macro, one panel per scoring; overall dashed, chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("generation", results)] if results["mode"] != "likelihood" else []
    panels += [("option likelihood", results["likelihood"])] if "likelihood" in results else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, scores) in zip(axes[0], panels):
        names = _group_names(scores)
        x = np.arange(len(names))
        for k, (kind, label) in enumerate((("micro", "micro (lmms-eval)"), ("macro", "macro (VLMEvalKit)"))):
            values = [scores["groups"][kind][g] for g in names]
            bars = ax.bar(x + (k - 0.5) * 0.38, [np.nan if v is None else v for v in values], 0.38, label=label)
            ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in values], fontsize=7)
        ax.axhline(scores["overall"], color="black", linestyle="--", linewidth=1,
                   label=f"overall {scores['overall']:.1f}")
        ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"VMCBench {results['data']['split']}: {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(results["model"]["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

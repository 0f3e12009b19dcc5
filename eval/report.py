"""results.md from results.json: one section per task, tables a person reads, figures linked."""
from __future__ import annotations

from typing import Any, Optional

from eval.factors import SEMANTIC


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]], digits: int = 2) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c, digits) for c in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(results: dict[str, Any]) -> str:
    m, d, s = results["model"], results["data"], results["settings"]
    lines = [f"# Evaluation: {m['name']}", "",
             f"- export: `{m['export']}` (kind {m['kind']}, {m['params_m']:.2f}M params, native "
             f"{m['native_image_size']} px)",
             f"- data: `{d['root']}` ({d['kind']}, label {d['label'] or '—'}, {d['classes']} classes)",
             f"- images: {s['extract']['image_size']} px, resize + centre crop, normalise {s['normalize']} "
             f"(mean {s['extract']['mean']}), {s['extract']['precision']} on {s['extract']['device']}",
             f"- time: {results['timing']['total_s']:.1f} s", ""]
    if results.get("compare"):
        c = results["compare"]
        lines.insert(3, f"- compared with: {c['name']} (`{c['export']}`)")
    summary = results.get("summary", {})
    if summary:
        lines += ["## Summary", ""] + _table(["metric", "value"], [[k, v] for k, v in summary.items()])
    for task, r in results["tasks"].items():
        lines += [f"## {task}", ""]
        if "skipped" in r:
            lines += [f"skipped: {r['skipped']}", ""]
            continue
        if "error" in r:
            lines += [f"**failed**: {r['error']}", ""]
            continue
        lines += _SECTIONS.get(task, _generic)(r)
        lines += [f"_{r.get('time_s', 0):.1f} s_", ""]
    return "\n".join(lines)


def _generic(r: dict[str, Any]) -> list[str]:
    return _table(["metric", "value"], [[k, v] for k, v in r.items() if isinstance(v, (int, float))])


def _probe(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    sel = "held-out part of train" if c["select_on"] == "heldout" else "val (the authors' protocol: optimistic)"
    lines = _table(["top-1 (%)", "top-5 (%)", "selection top-1", "chance", "best epoch", "lr", "weight decay"],
                   [[r["top1"], r["top5"], r["selection_top1"], r["chance_top1"], r["best_epoch"], f"{r['lr']:g}",
                     f"{r['weight_decay']:g}"]])
    lines += [f"Selected on the {sel}; {r['train_samples']} fit / {r['selection_samples']} selection / "
              f"{r['val_samples']} val samples; {c['epochs']} epochs ({c['warmup_epochs']} warm-up), grid "
              f"{len(c['lrs'])} LR x {len(c['weight_decays'])} WD at {c['grid_epochs']} epochs, batch "
              f"{c['batch_size']}.", ""]
    return lines


def _knn(r: dict[str, Any]) -> list[str]:
    return _table(["top-1 (%)", "top-5 (%)", "k", "T", "train", "val"],
                  [[r["top1"], r["top5"], r["k"], r["temperature"], r["train_samples"], r["val_samples"]]])


def _zero_shot(r: dict[str, Any]) -> list[str]:
    lines = _table(["top-1 (%)", "top-5 (%)", "classes", "val samples", "prompts / class"],
                   [[r["top1"], r["top5"], r["classes"], r["val_samples"], r["prompts_per_class"]]])
    return lines + ["Example prompts: " + "; ".join(f"`{p}`" for p in r["example_prompts"]), ""]


def _retrieval(r: dict[str, Any]) -> list[str]:
    ks = sorted({int(k.split("_r")[1]) for k in r if k.startswith("i2t_r")})
    rows = [[d] + [r[f"{d}_r{k}"] for k in ks] for d in ("i2t", "t2i")]
    lines = _table(["direction"] + [f"R@{k} (%)" for k in ks], rows)
    return lines + [f"{int(r['pairs'])} image-caption pairs, {r['distinct_captions']} distinct captions "
                    "(ties with duplicate captions count as hits).", ""]


def _embedding(r: dict[str, Any]) -> list[str]:
    names = list(r["models"])
    lines = [f"{r['samples']} val images for the all-pairs statistics.", ""]
    rows = []
    for n in names:
        st = r["models"][n]
        lab = st.get("label", {})
        rows.append([n, st["random_pair_similarity"], lab.get("intra"), lab.get("inter"), lab.get("gap"),
                     lab.get("gap_normalized")])
    lines += _table(["model", "random pair sim", "intra-class sim", "inter-class sim", "gap",
                     "gap / (1 - random)"], rows, 3)
    first = r["models"][names[0]]
    if "controlled" in first:
        header = ["factor"] + [f"{n}: {col}" for n in names for col in ("sensitivity", "pair sim", "probe %")]
        rows = []
        for f in first["controlled"]:
            row: list[Any] = [f"**{f}**" if f in SEMANTIC else f]
            for n in names:
                st = r["models"][n]
                row += [st["controlled"][f]["sensitivity"], st["controlled"][f]["similarity"],
                        st["factor_probe"][f]["top1"]]
            rows.append(row)
        lines += ["Factor sensitivity (controlled pairs differing only in that factor; 0 = invariant, 1 = as "
                  "different as a random image), raw pair similarity, and per-factor probe accuracy. Semantic "
                  "factors in bold.", ""] + _table(header, rows, 3)
        rows = [[f] + [r["models"][n]["natural"][f]["gap_normalized"] for n in names] for f in first["natural"]]
        lines += ["Val pairs: (similarity(agree in factor) - similarity(differ)) / (1 - random pair similarity).", ""]
        lines += _table(["factor"] + names, rows, 3)
    if "disagreement" in r:
        lines += _disagreement(r["disagreement"])
    lines += [f"![{p}]({p})" for p in r.get("plots", [])] + [""]
    return lines


def _disagreement(d: dict[str, Any]) -> list[str]:
    a, b, t = d["models"]["a"], d["models"]["b"], d["thresholds"]
    lines = [f"### Disagreement pairs: A = {a}, B = {b}", "",
             f"Correlation of pair similarities: {d['similarity_correlation']:.3f}; mean similarity A "
             f"{d['mean_similarity']['a']:.3f}, B {d['mean_similarity']['b']:.3f}; {d['pairs_total']} pairs.", ""]
    rows = [[f"A > {t['a_high']} and B < {t['b_low']}", d["a_high_b_low"]["count"], d["a_high_b_low"]["selection"]],
            [f"B > {t['b_high']} and A < {t['a_low']}", d["b_high_a_low"]["count"], d["b_high_a_low"]["selection"]]]
    lines += _table(["set", "pairs", "figure shows"], rows)
    base: Optional[dict[str, float]] = d.get("factor_agreement_all_pairs")
    if base:
        rows = [[f, base[f], d["a_high_b_low"]["factor_agreement"][f], d["b_high_a_low"]["factor_agreement"][f]]
                for f in base]
        lines += ["Fraction of pairs sharing each factor (all pairs vs each disagreement set):", ""]
        lines += _table(["factor", "all pairs", "high A low B", "high B low A"], rows, 3)
    return lines


_SECTIONS = {"linear_probe": _probe, "knn": _knn, "zero_shot": _zero_shot, "retrieval": _retrieval,
             "embedding": _embedding}

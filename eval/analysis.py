"""The `embedding` task: statistics of eval/embedding.py per model, controlled pairs on the synthetic world,
per-factor linear probes, disagreement pairs with a second export, and their figures.

Per model (val split, at most `max_pair_images` images for all-pairs statistics):
- label intra- vs inter-class similarity and the class x class similarity heatmap (up to 60 classes);
- synthetic world only: per factor a linear-probe accuracy (train -> val, small fixed grid), the natural
  agree / differ similarity gap, and the controlled sensitivity on `pairs_per_factor` rendered pairs;
- with `--compare`: disagreement pairs (eval/disagreement.py) and an image grid of the top pairs.
Rendered pairs: base factors are val records, re-rendered (not the shard JPEG) so both images of a pair go
through identical rendering, at the world's image size, then the usual eval transform.
"""
from __future__ import annotations

import math
import random
from typing import Any

import torch

from data.synthetic import WorldSpec, render_image
from eval import plots
from eval.context import EvalContext, LoadedModel
from eval.data import read_images, read_records
from eval.disagreement import Thresholds, find_disagreements
from eval.embedding import analyse, controlled_sensitivity, normalized, subsample
from eval.factors import CLASSES, FACTOR_NAMES, controlled_pairs, describe_change
from eval.features import encode_pil
from eval.linear_probe import ProbeConfig, linear_probe

HEATMAP_MAX_CLASSES = 60


def factor_probes(ctx: EvalContext, model: LoadedModel) -> dict[str, dict[str, Any]]:
    """Linear-probe top-1 (%) per factor, train -> val, with a small fixed grid (selection on held-out train)."""
    train, val = ctx.features("train", model), ctx.features("val", model)
    epochs = ctx.settings.factor_probe_epochs
    cfg = ProbeConfig(lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=epochs, warmup_epochs=max(1, epochs // 10),
                      grid_epochs=max(1, epochs // 3), batch_size=256, seed=ctx.settings.seed)
    out = {}
    for i, name in enumerate(FACTOR_NAMES):
        r = linear_probe(train.cls, train.factors[:, i], val.cls, val.factors[:, i], len(CLASSES[name]), cfg,
                         ctx.device)
        out[name] = {"top1": r["top1"], "chance_top1": r["chance_top1"]}
    return out


def _controlled(ctx: EvalContext, random_sim: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """Controlled-pair sensitivity per model, and the heatmap figure of one base image and its variants."""
    s, data = ctx.settings, ctx.data
    records = read_records(data.shards("val"))
    size = int((data.world or {}).get("image_size", 64))
    spec = WorldSpec.from_json((data.world or {}).get("spec"))
    pairs = controlled_pairs(records, FACTOR_NAMES, s.pairs_per_factor, s.seed, spec)
    base_images = [render_image(b, size, spec) for _, b, _ in pairs]
    varied_images = [render_image(v, size, spec) for _, _, v in pairs]
    rng = random.Random(s.seed + 1)
    base = rng.choice(records)
    showcase = [("base", base)] + [(describe_change(base, v, f), v) for f in FACTOR_NAMES
                                   for v in [controlled_pairs([base], (f,), 1, s.seed + 2, spec)[0][2]]]
    show_images = [render_image(f, size, spec) for _, f in showcase]
    per_model, matrices = {}, {}
    for model in ctx.models():
        zb = normalized(encode_pil(model.module, model.kind, base_images, model.extract)[0])
        zv = normalized(encode_pil(model.module, model.kind, varied_images, model.extract)[0])
        per_model[model.name] = controlled_sensitivity(zb, zv, [f for f, _, _ in pairs], random_sim[model.name])
        zs = normalized(encode_pil(model.module, model.kind, show_images, model.extract)[0])
        matrices[model.name] = zs @ zs.T  # (1 + F, 1 + F)
    figure = plots.controlled_heatmaps(show_images, [label for label, _ in showcase], matrices,
                                       ctx.out / "embedding_controlled_heatmap.png")
    return per_model, [figure.name]


def _disagreement(ctx: EvalContext, z: dict[str, torch.Tensor], keys: list[str], factors) -> tuple[dict, list]:
    a, b = ctx.model, ctx.compare
    s = ctx.settings
    report = find_disagreements(z[a.name], z[b.name], Thresholds.parse(s.thresholds), s.top_pairs, factors,
                                FACTOR_NAMES if factors is not None else ())
    report["models"] = {"a": a.name, "b": b.name}
    wanted = {keys[p[k]] for name in ("a_high_b_low", "b_high_a_low") for p in report[name]["pairs"] for k in (0, 1)}
    images = read_images(ctx.data.shards("val"), wanted)
    sets = {}
    for name, title in (("a_high_b_low", f"high {a.name}, low {b.name}"), ("b_high_a_low", f"high {b.name}, "
                                                                                           f"low {a.name}")):
        entry = report[name]
        title += " (threshold)" if entry["selection"] == "threshold" else " (relative: none past thresholds)"
        sets[title] = [(images[keys[i]], images[keys[j]], f"{a.name} {sa:.2f} / {b.name} {sb:.2f}")
                       for i, j, sa, sb in entry["pairs"] if keys[i] in images and keys[j] in images]
        entry["pairs"] = [{"key_i": keys[i], "key_j": keys[j], "sim_a": sa, "sim_b": sb}
                          for i, j, sa, sb in entry["pairs"]]
    figure = plots.pair_grid(sets, ctx.out / "embedding_disagreement_pairs.png")
    return report, [figure.name]


def embedding_analysis(ctx: EvalContext) -> dict[str, Any]:
    s, data = ctx.settings, ctx.data
    models = ctx.models()
    val = {m.name: ctx.features("val", m) for m in models}
    first = val[models[0].name]
    if any(v.keys != first.keys for v in val.values()):
        raise ValueError("the compared exports saw different val samples")
    idx = subsample(len(first), s.max_pair_images, s.seed)
    z = {name: normalized(v.cls[idx]) for name, v in val.items()}
    labels = first.labels[idx] if data.kind != "unlabeled" else None
    factors = first.factors[idx] if data.kind == "synthetic" else None
    num_classes = len(data.classes or [])
    out: dict[str, Any] = {"models": {}, "plots": [], "samples": len(idx)}
    for m in models:
        stats = analyse(z[m.name], labels, num_classes, factors, FACTOR_NAMES if factors is not None else ())
        matrix = stats.pop("class_similarity", None)
        if matrix is not None and num_classes <= HEATMAP_MAX_CLASSES:
            name = f"embedding_class_similarity_{len(out['plots'])}.png"
            plots.heatmap(matrix, data.classes, f"{m.name}: mean cosine similarity by {data.label}", ctx.out / name)
            out["plots"].append(name)
        if data.kind == "synthetic":
            stats["factor_probe"] = factor_probes(ctx, m)
        out["models"][m.name] = stats
    if data.kind == "synthetic":
        random_sim = {m.name: out["models"][m.name]["random_pair_similarity"] for m in models}
        controlled, figures = _controlled(ctx, random_sim)
        for name, per_factor in controlled.items():
            out["models"][name]["controlled"] = per_factor
        out["plots"] += figures + _factor_figures(ctx, out["models"])
    if ctx.compare is not None:
        keys = [first.keys[i] for i in idx.tolist()]
        out["disagreement"], figures = _disagreement(ctx, z, keys, factors)
        out["plots"] += figures
    out["summary"] = _summary(out["models"][ctx.model.name])
    return out


def _factor_figures(ctx: EvalContext, models: dict[str, Any]) -> list[str]:
    figures = []
    sens = {n: {f: v["sensitivity"] for f, v in m["controlled"].items()} for n, m in models.items()}
    figures.append(plots.factor_bars(sens, "controlled pairs: sensitivity to a one-factor change",
                                     "(1 - sim) / (1 - sim random pair)", ctx.out / "embedding_sensitivity.png"))
    gap = {n: {f: v["gap_normalized"] for f, v in m["natural"].items()} for n, m in models.items()}
    figures.append(plots.factor_bars(gap, "val pairs: similarity(agree) - similarity(differ)",
                                     "gap / (1 - sim random pair)", ctx.out / "embedding_natural_gap.png"))
    probe = {n: {f: v["top1"] for f, v in m["factor_probe"].items()} for n, m in models.items()}
    chance = {f: v["chance_top1"] for f, v in next(iter(models.values()))["factor_probe"].items()}
    figures.append(plots.factor_bars(probe, "linear probe per factor (black: majority class)", "top-1 (%)",
                                     ctx.out / "embedding_factor_probe.png", reference=chance))
    return [f.name for f in figures]


def _summary(stats: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "label" in stats:
        out["intra_inter_gap"] = stats["label"]["gap_normalized"]
    for f, v in (stats.get("controlled") or {}).items():
        out[f"sensitivity/{f}"] = v["sensitivity"]
    for f, v in (stats.get("factor_probe") or {}).items():
        out[f"factor_probe/{f}"] = v["top1"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

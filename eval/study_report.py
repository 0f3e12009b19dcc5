"""The study's report: OUT/report/report.md with PNGs, from the stage folders that `launch/reproduce.py` wrote.

Reads what exists and says what is missing: a failed or unfinished stage leaves its rows as "-" with the stage's
status and log. Sections: stages, encoder probes (mean +- std over seeds), factor sensitivity, CLIP/DINO
disagreement, VMCBench groups under both conventions, CLIP - DINO beside the paper's figures, the config diff.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional

from eval.study_plots import bar_groups, delta_bars, loss_curves

GROUPS = ("General", "Reasoning", "OCR", "Doc&Chart")
# The paper's figures (study-facts.md: from the paper's summary, not checked against its body)
PAPER = {
    "linear_probe/top1": ("ImageNet linear probe top-1", 65.8, 66.4),
    "vmcbench/OCR": ("VMCBench OCR (TextVQA + OCRVQA)", 47.5, 40.0),
}
# keys in which variants may differ: the objective and its own recipe; anything else is a broken control
RECIPE_PREFIXES = ("objective.", "optim.", "dino.", "clip.", "siglip.", "hybrid.", "model.frozen_text.",
                   "model.dino_head.", "model.text.", "model.vision.init", "model.vision.norm_eps",
                   "model.vision.patch_bias", "model.vision.drop_path", "run.", "seed", "loss.", "deepspeed.zero",
                   "data.augment", "schedule.warmup")


def load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _records(out: Path) -> list[dict]:
    study = load_json(out / "study.json") or {}
    return study.get("stages", [])


def write_report(out: Path, preset: dict, notes: str = "") -> Path:
    """Write OUT/report/report.md (+ PNGs); returns its path."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    records = _records(out)
    variants = list(dict.fromkeys(r["variant"] for r in records if r["kind"] in ("pretrain", "source")))
    lines = [f"# Study report: preset `{preset.get('name', '?')}`", "",
             f"{preset.get('description', '')}. Written {time.strftime('%Y-%m-%d %H:%M %Z')} by "
             "`launch/reproduce.py`; every figure below is read from the stage folders under "
             f"`{out}` (rerun the same command to refresh it).", ""]
    if notes:
        lines += ["## What this run shows and what it cannot", "", notes.strip(), ""]
    lines += _stage_section(records)
    lines += _training_section(out, records, report)
    evals = {v: [load_json(out / r["name"] / "results.json") for r in records
                 if r["kind"] == "eval" and r["variant"] == v] for v in variants}
    evals = {v: [e for e in es if e] for v, es in evals.items()}
    lines += _probe_section(evals, report)
    lines += _factor_section(evals, report)
    lines += _compare_section(out, records, report)
    vmc = {r["variant"]: load_json(out / r["name"] / "results.json") for r in records
           if r["kind"] == "vmcbench" and r["seed"] == 0}
    lines += _vmcbench_section({v: r for v, r in vmc.items() if r}, report)
    lines += _delta_section(evals, {v: r for v, r in vmc.items() if r}, report)
    lines += _config_section(out, records)
    path = report / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _stage_section(records: list[dict]) -> list[str]:
    lines = ["## Stages", "", "| stage | status | time | log |", "|---|---|---|---|"]
    for r in records:
        status = r.get("status", "?")
        if status == "failed":
            status = f"**failed**: {r.get('error', '')}"
        elif status == "blocked":
            status = f"blocked by {', '.join(r.get('blocked_by', []))}"
        seconds = f"{r['seconds']:.0f} s" if r.get("seconds") else "-"
        lines.append(f"| {r['name']} | {status} | {seconds} | `{r.get('log', '-')}` |")
    return lines + [""]


def _metrics(run_dir: Path) -> list[dict]:
    rows = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    except OSError:
        pass
    return rows


def _training_section(out: Path, records: list[dict], report: Path) -> list[str]:
    kinds = {"pretrain": "pretraining", "vlm_stage1": "VLM stage 1", "vlm_stage2": "VLM stage 2"}
    panels: dict[str, dict] = {title: {} for title in kinds.values()}
    lines = ["## Training", "", "| run | steps | samples seen | loss first → last | median samples/s | median MFU |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] not in kinds:
            continue
        rows = [row for row in _metrics(out / r["name"]) if isinstance(row.get("loss"), (int, float))]
        if not rows:
            continue
        panels[kinds[r["kind"]]][r["name"].split("/", 1)[1]] = [(row["step"], row["loss"]) for row in rows]
        speed = statistics.median(row.get("samples_per_s") or 0 for row in rows)
        mfus = [row["mfu"] for row in rows if isinstance(row.get("mfu"), (int, float))]
        mfu = f"{100 * statistics.median(mfus):.0f}%" if mfus else "-"
        lines.append(f"| {r['name']} | {rows[-1]['step']} | {rows[-1].get('samples_seen', 0):,} | "
                     f"{rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f} | {speed:.1f} | {mfu} |")
    if len(lines) == 4:
        return []
    loss_curves(panels, report / "losses.png")
    return lines + ["", "MFU against the device's peak as the trainer logs it (on a CPU: a measured fp32 GEMM).", "",
                    "![losses](losses.png)", ""]


def _probe_section(evals: dict[str, list[dict]], report: Path) -> list[str]:
    lines = ["## Encoder probes", ""]
    if not any(evals.values()):
        return lines + ["No eval stage finished.", ""]
    first = next(e for es in evals.values() for e in es)
    label, classes = first["data"].get("label", "class"), first["data"].get("classes")
    chance = f"; chance {100 / classes:.1f}%" if classes else ""
    lines += [f"Top-1 (%) on `{first['data'].get('root')}`, label `{label}` ({classes} classes{chance}); mean ± std "
              "over seeds (one seed: the value alone). Linear probe: " + _probe_protocol(first) + ".", "",
              ]
    columns = {"linear probe": "linear_probe/top1", "kNN": "knn/top1", "zero-shot": "zero_shot/top1"}
    values = {v: {c: [e["summary"][k] for e in es if k in e["summary"]] for c, k in columns.items()}
              for v, es in evals.items()}
    shown = [c for c in columns if any(values[v][c] for v in values)]
    lines += ["| variant | seeds | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    bars = {}
    for v, es in evals.items():
        lines.append(f"| {v} | {len(es)} | " + " | ".join(mean_std(values[v][c]) for c in shown) + " |")
        bars[v] = {c: values[v][c] for c in shown}
    bar_groups(bars, report / "probes.png", "top-1 (%)", f"Encoder probes ({label})",
               chance=100 / classes if classes else None)
    return lines + ["", "![probes](probes.png)", ""]


def _probe_protocol(result: dict) -> str:
    settings = result.get("settings", {})
    return f"protocol `{settings.get('protocol', 'corrected')}`, preset `{settings.get('probe_preset', 'auto')}`"


def _factor_section(evals: dict[str, list[dict]], report: Path) -> list[str]:
    probe = {v: _factor_values(es, "embedding/factor_probe/") for v, es in evals.items()}
    sens = {v: _factor_values(es, "embedding/sensitivity/") for v, es in evals.items()}
    if not any(probe.values()):
        return []
    factors = sorted({f for d in probe.values() for f in d})
    lines = ["## Factor sensitivity", "",
             "A linear probe per factor of the synthetic world (accuracy, %), and the sensitivity: how much the "
             "embedding moves when only that factor changes in a controlled pair (eval/factors.py; higher = more "
             "sensitive). Mean over seeds.", "",
             "| variant | " + " | ".join(f"{f} probe" for f in factors) + " |", "|---|" + "---|" * len(factors)]
    for v in probe:
        lines.append(f"| {v} | " + " | ".join(mean_std(probe[v].get(f, [])) for f in factors) + " |")
    lines += ["", "| variant | " + " | ".join(f"{f} sensitivity" for f in factors) + " |",
              "|---|" + "---|" * len(factors)]
    for v in sens:
        lines.append(f"| {v} | " + " | ".join(
            f"{statistics.mean(sens[v][f]):.3f}" if sens[v].get(f) else "-" for f in factors) + " |")
    bar_groups({v: probe[v] for v in probe}, report / "factor_probe.png", "accuracy (%)", "Linear probe per factor")
    bar_groups({v: sens[v] for v in sens}, report / "factor_sensitivity.png", "sensitivity",
               "Embedding sensitivity per factor")
    return lines + ["", "![factor probe](factor_probe.png)", "", "![factor sensitivity](factor_sensitivity.png)", ""]


def _factor_values(results: list[dict], prefix: str) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for e in results:
        for k, v in e["summary"].items():
            if k.startswith(prefix) and isinstance(v, (int, float)) and not k.endswith("rotation"):
                values.setdefault(k[len(prefix):], []).append(float(v))
    return values


def _compare_section(out: Path, records: list[dict], report: Path) -> list[str]:
    lines = []
    for r in records:
        if r["kind"] != "compare":
            continue
        folder = out / r["name"]
        lines += [f"### Disagreement: {r['variant'].replace('_vs_', ' vs ')} (seed {r['seed']})", ""]
        if r.get("status") not in ("done",):
            lines += [f"Stage {r.get('status')}: see `{r.get('log')}`.", ""]
            continue
        result = load_json(folder / "results.json") or {}
        dis = (result.get("tasks", {}).get("embedding", {}) or {}).get("disagreement") or {}
        a, b = r["variant"].split("_vs_")
        if dis:
            lines += [f"{dis['pairs_total']:,} val pairs; similarity correlation {dis['similarity_correlation']:.2f}; "
                      f"mean pair similarity {a} {dis['mean_similarity']['a']:.2f}, {b} {dis['mean_similarity']['b']:.2f}.",
                      "", f"| set | pairs past the thresholds | shown | factors the shown pairs share (%) |",
                      "|---|---|---|---|"]
            for key, title in (("a_high_b_low", f"high {a}, low {b}"), ("b_high_a_low", f"high {b}, low {a}")):
                entry = dis.get(key) or {}
                share = ", ".join(f"{f} {100 * v:.0f}" for f, v in (entry.get("factor_agreement") or {}).items())
                lines.append(f"| {title} | {entry.get('count', 0):,} | {entry.get('selection', '-')} | {share or '-'} |")
            lines.append("")
        for png in ("embedding_disagreement_pairs.png", "embedding_controlled_heatmap.png",
                    "embedding_sensitivity.png"):
            if (folder / png).is_file():
                target = f"{r['variant']}_s{r['seed']}_{png}"
                shutil.copyfile(folder / png, report / target)
                lines += [f"![{png}]({target})", ""]
    return (["## CLIP / DINO disagreement", "",
             "Image pairs one encoder finds similar and the other does not (the authors' thresholds), and the "
             "controlled heatmaps (eval/disagreement.py); from `launch/eval.py --compare`.", ""] + lines) if lines else []


def _vmcbench_section(vmc: dict[str, dict], report: Path) -> list[str]:
    if not vmc:
        return []
    any_result = next(iter(vmc.values()))
    n = any_result["n"]
    se = 100 * math.sqrt(0.25 * 0.75 / n)
    lines = ["## VMCBench", "",
             f"`{any_result['data']['source']}`, split `{any_result['data']['split']}`, {n} questions; groups micro "
             "(lmms-eval: mean over the group's questions) / macro (VLMEvalKit: mean over the group's sources). "
             f"Chance is 25%; one standard error at chance over all {n} questions is {se:.1f} points.", "",
             "| VLM on | overall | " + " | ".join(f"{g} micro / macro" for g in GROUPS) + " | unparsed |",
             "|---|---|" + "---|" * len(GROUPS) + "---|"]
    for v, r in vmc.items():
        cells = " | ".join(f"{_pct(r['groups']['micro'].get(g))} / {_pct(r['groups']['macro'].get(g))}"
                           for g in GROUPS)
        lines.append(f"| {v} | {r['overall']:.1f} | {cells} | {r['unparsed']}/{r['n']} |")
    bar_groups({v: {f"{g} micro": [r["groups"]["micro"][g]] for g in GROUPS if g in r["groups"]["micro"]}
                | {f"{g} macro": [r["groups"]["macro"][g]] for g in GROUPS if g in r["groups"]["macro"]}
                for v, r in vmc.items()}, report / "vmcbench_groups.png", "accuracy (%)", "VMCBench groups",
               chance=25.0)
    return lines + ["", "![VMCBench groups](vmcbench_groups.png)", ""]


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _delta_section(evals: dict, vmc: dict, report: Path) -> list[str]:
    if "clip" not in evals or "dino" not in evals:
        return []
    ours: dict[str, Optional[float]] = {}
    for key in ("linear_probe/top1", "knn/top1"):
        a = [e["summary"][key] for e in evals["clip"] if key in e["summary"]]
        b = [e["summary"][key] for e in evals["dino"] if key in e["summary"]]
        ours[key] = statistics.mean(a) - statistics.mean(b) if a and b else None
    for g in GROUPS:
        for conv in ("micro", "macro"):
            if "clip" in vmc and "dino" in vmc:
                a, b = vmc["clip"]["groups"][conv].get(g), vmc["dino"]["groups"][conv].get(g)
                ours[f"vmcbench/{g} {conv}"] = a - b if a is not None and b is not None else None
    if "clip" in vmc and "dino" in vmc:
        ours["vmcbench/overall"] = vmc["clip"]["overall"] - vmc["dino"]["overall"]
    lines = ["## CLIP − DINO, ours beside the paper's", "",
             "Points (ours: this run's data; the paper's: ImageNet and real VMCBench, from its summary, "
             "not checked against the paper body). On other data the numbers are not comparable in size; "
             "the sign is the question.", "", "| metric | ours | paper (CLIP, DINO) | paper CLIP − DINO |",
             "|---|---|---|---|"]
    paper_of = {"linear_probe/top1": "linear_probe/top1", "vmcbench/OCR micro": "vmcbench/OCR"}
    plotted = {}
    for key, value in ours.items():
        ref = PAPER.get(paper_of.get(key, ""))
        paper = f"{ref[1]:.1f}, {ref[2]:.1f} ({ref[0]})" if ref else "-"
        paper_delta = f"{ref[1] - ref[2]:+.1f}" if ref else "-"
        lines.append(f"| {key} | {'-' if value is None else f'{value:+.1f}'} | {paper} | {paper_delta} |")
        if value is not None:
            plotted[key] = (value, ref[1] - ref[2] if ref else None)
    if plotted:
        delta_bars(plotted, report / "deltas.png")
        lines += ["", "![CLIP - DINO](deltas.png)"]
    return lines + [""]


def _config_section(out: Path, records: list[dict]) -> list[str]:
    from train.config_loader import ConfigError, diff_configs, load_config

    runs = [r for r in records if r["kind"] == "pretrain" and r["seed"] == 0]
    runs = [r for r in runs if (out / r["name"] / "config.yaml").is_file()]
    if len(runs) < 2:
        return []
    lines = ["## What differed between the pretraining runs", "",
             f"Every variant against `{runs[0]['variant']}` (seed 0), on the fully merged configs the runs saved. "
             "Keys of the objective's own recipe are expected to differ; anything else would break the control.", ""]
    try:
        base = load_config(out / runs[0]["name"] / "config.yaml")
        differing: set[str] = set()
        for r in runs[1:]:
            rows = [row for row in diff_configs(base, load_config(out / r["name"] / "config.yaml"))
                    if not row[0].startswith("run.")]  # the run's name and folder differ by construction
            differing |= {k for k, _, _ in rows}
            other = [row for row in rows if not row[0].startswith(RECIPE_PREFIXES)]
            lines += [f"### {runs[0]['variant']} vs {r['variant']}: {len(rows)} keys differ, "
                      + ("all of them the objective's recipe" if not other
                         else f"**{len(other)} outside the recipe**: {', '.join(k for k, _, _ in other)}"), "",
                      "| key | " + runs[0]["variant"] + " | " + r["variant"] + " |", "|---|---|---|"]
            lines += [f"| `{k}` | `{a!r}` | `{b!r}` |" for k, a, b in rows]
            lines.append("")
        control = ["model.vision.size", "model.vision.patch_size", "model.vision.image_size", "model.vision.pre_norm",
                   "data.train", "schedule.global_batch", "schedule.steps", "schedule.epochs"]
        same = [k for k in control if k not in differing]
        lines += ["Identical in every run: " + (", ".join(f"`{k}`" for k in same) or "none") + "."
                  + (f" **Different: {', '.join(k for k in control if k in differing)}.**" if len(same) < len(control)
                     else ""), ""]
        seen = {r["variant"]: _samples_seen(out / r["name"]) for r in runs}
        lines += ["Samples seen (last metrics row): " + ", ".join(f"{v} {n:,}" if n is not None else f"{v} -"
                                                                 for v, n in seen.items()) + ".", ""]
    except ConfigError as e:
        lines += [f"Could not read a run's config: {e}", ""]
    return lines


def _samples_seen(run_dir: Path) -> Optional[int]:
    try:
        last = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
        return int(json.loads(last)["samples_seen"])
    except (OSError, IndexError, KeyError, ValueError):
        return None

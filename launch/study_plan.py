"""The study as a list of stages: a preset (launch/configs/study/*.yaml) -> Stage objects with their commands.

Stages, per variant v and seed s (names are also folder names under OUT):
    pretrain/v_s   launch/pretrain.py (resume=auto: a rerun continues from the newest checkpoint)
    source/v       (released preset) models.convert.* turns a released Hugging Face encoder into an export
    eval/v_s       launch/eval.py on the final export: linear probe, kNN, per-factor analysis
    compare/a_b_s  launch/eval.py --compare: disagreement pairs and controlled heatmaps of two encoders
    vlm1/v  vlm2/v launch/train_vlm.py stage 1 (projector) and stage 2 (projector + LLM), resume=auto
    vmcbench/v     launch/eval_vmcbench.py on the stage-2 export
A command is built when its stage starts (`Stage.command(out)`): the exports it reads exist only by then.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "launch" / "configs" / "study"
VARIANTS = ("clip", "siglip", "dino", "clip_frozen_text", "hybrid")
PRESET_KEYS = {"description", "variants", "seeds", "launcher", "pretrain", "released", "eval", "compare", "vlm",
               "vmcbench", "estimates_s", "paths", "notes", "gpus"}
TRAINING_KINDS = ("pretrain", "vlm_stage1", "vlm_stage2")


class PlanError(ValueError):
    """A preset or option that cannot make a plan (one line, names the fix)."""


@dataclass
class Stage:
    name: str                       # "pretrain/clip_s0": also its folder under OUT
    kind: str                       # pretrain | source | eval | compare | vlm_stage1 | vlm_stage2 | vmcbench
    variant: str
    seed: int
    deps: list[str]
    build: Callable[[Path], list[str]] = field(repr=False)  # OUT -> argv (run from the repo root)
    estimate_s: float = 60.0

    def command(self, out: Path) -> list[str]:
        return self.build(out)

    def folder(self, out: Path) -> Path:
        return out / self.name


DRY_RUN = False  # set by `reproduce.py --dry-run`: exports that do not exist yet print as placeholders


def newest_export(run_dir: Path) -> Path:
    exports = sorted((run_dir / "export").glob("step_*"))
    if not exports and DRY_RUN:
        return run_dir / "export" / "step_<last>"
    if not exports:
        raise FileNotFoundError(f"{run_dir} has no export/step_* (did its stage finish?)")
    return exports[-1]


def load_preset(name_or_path: str, sets: list[str] = ()) -> dict:
    """A preset by name (tiny, paper, released) or YAML path; `sets` are dotted KEY=VALUE overrides (YAML values)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise PlanError(f"no preset {name_or_path!r} (known: {', '.join(known)}; or a YAML file)")
    preset = _read_preset(path)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise PlanError(f"--set {item!r}: expected KEY=VALUE")
        _set_dotted(preset, key, yaml.safe_load(value))
    _check_keys(preset, PRESET_KEYS, "preset")
    preset["name"] = path.stem
    return preset


def _read_preset(path: Path) -> dict:
    """A preset file; `extends: other.yaml` (beside it) is read first, its sections updated key by key."""
    preset = yaml.safe_load(path.read_text()) or {}
    _check_keys(preset, PRESET_KEYS | {"extends"}, "preset")
    parent = preset.pop("extends", None)
    if parent:
        merged = _read_preset(path.parent / parent)
        for key, value in preset.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        preset = merged
    return preset


def _check_keys(d: dict, allowed: set, where: str) -> None:
    for key in d:
        if key not in allowed and key != "name":
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            raise PlanError(f"unknown {where} key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise PlanError(f"--set {key}: {part} is not a section")
    d[parts[-1]] = value


def expand(value: str, preset: dict, strict: bool) -> str:
    """`${VAR}` from the environment, else the preset's `paths`; strict: an unset variable is an error."""
    paths = {k: str(v) for k, v in (preset.get("paths") or {}).items()}

    def sub(m: re.Match) -> str:
        var = m.group(1)
        if var in os.environ:
            return os.environ[var]
        if var in paths:
            return paths[var]
        if strict:
            raise PlanError(f"{value!r} needs ${{{var}}}: export {var}=... (docs/reproduce.md lists each path)")
        return m.group(0)

    return re.sub(r"\$\{(\w+)\}", sub, str(value))


def _argv(preset: dict, script: str, training: bool) -> list[str]:
    launcher = shlex.split(expand(preset.get("launcher", "python"), preset, strict=False)) if training else ["python"]
    if launcher == ["python"]:
        launcher = [sys.executable]
    return [*launcher, str(ROOT / "launch" / script)]


def make_plan(preset: dict, variants: Optional[list[str]] = None, seeds: Optional[int] = None,
              strict_paths: bool = True) -> list[Stage]:
    """Every stage in an order that respects dependencies (a stage's deps come before it)."""
    variants = list(variants or preset.get("variants") or [])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise PlanError(f"unknown variant(s) {unknown} (choose from {', '.join(VARIANTS)})" if unknown
                        else "no variants")
    seeds = int(seeds or preset.get("seeds", 1))
    released = preset.get("released") or {}
    if released:
        missing = [v for v in variants if v not in released]
        if missing:
            raise PlanError(f"the released preset has no encoder for {missing} (it has {sorted(released)})")
        seeds = 1  # one released checkpoint per variant
    est = preset.get("estimates_s") or {}
    ex = lambda v: expand(v, preset, strict_paths)  # noqa: E731
    stages: list[Stage] = []
    encoder_stage: dict[tuple[str, int], str] = {}

    for variant in variants:
        for seed in range(seeds):
            if released:
                stages.append(_source_stage(preset, variant, ex, est))
            else:
                stages.append(_pretrain_stage(preset, variant, seed, ex, est))
            encoder_stage[(variant, seed)] = stages[-1].name
    for variant in variants:
        for seed in range(seeds):
            stages.append(_eval_stage(preset, variant, seed, encoder_stage[(variant, seed)], ex, est))
    for a, b in (preset.get("compare") or {}).get("pairs") or []:
        if a in variants and b in variants:
            for seed in range(seeds):
                stages.append(_compare_stage(preset, a, b, seed, encoder_stage, ex, est))
    vlm = preset.get("vlm") or {}
    if vlm:
        for variant in variants:
            for seed in range(min(seeds, int(vlm.get("seeds", 1)))):
                stages.extend(_vlm_stages(preset, variant, seed, encoder_stage[(variant, seed)], ex, est))
    return stages


def _encoder_of(stage_name: str, out: Path) -> Path:
    folder = out / stage_name
    return newest_export(folder) if stage_name.startswith("pretrain/") else folder / "export"


def _pretrain_stage(preset, variant, seed, ex, est) -> Stage:
    p = preset.get("pretrain") or {}
    config = ex(str(p["config"]).format(variant=variant))
    if not (ROOT / config).is_file() and not Path(config).is_file():
        raise PlanError(f"pretrain config {config} does not exist")
    extra = [ex(o) for o in p.get("overrides") or []] + [ex(o) for o in (p.get("variant_overrides") or {}).get(variant, [])]
    name = f"pretrain/{variant}_s{seed}"

    def build(out: Path) -> list[str]:
        return [*_argv(preset, "pretrain.py", True), "--config", config, f"run.dir={out / name}", f"seed={seed}",
                "resume=auto", "logging.progress=false", *extra]

    return Stage(name, "pretrain", variant, seed, [], build, _estimate(est, "pretrain", variant))


def _source_stage(preset, variant, ex, est) -> Stage:
    spec = preset["released"][variant]
    converter, source = spec["converter"], ex(spec["path"])
    args = [ex(a) for a in spec.get("args") or []]
    name = f"source/{variant}"

    def build(out: Path) -> list[str]:
        return [sys.executable, "-m", converter, source, "--out", str(out / name / "export"), *args]

    return Stage(name, "source", variant, 0, [], build, _estimate(est, "source", variant))


def _eval_stage(preset, variant, seed, encoder, ex, est) -> Stage:
    e = preset.get("eval") or {}
    name = f"eval/{variant}_s{seed}"
    data, tasks, args = ex(e["data"]), e.get("tasks", "linear_probe,knn,embedding"), [ex(a) for a in e.get("args") or []]

    def build(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "launch" / "eval.py"), "--checkpoint", str(_encoder_of(encoder, out)),
                "--data", data, "--tasks", tasks, "--out", str(out / name), "--name", f"{variant}_s{seed}",
                "--seed", str(seed), "--no-progress", *args]

    return Stage(name, "eval", variant, seed, [encoder], build, _estimate(est, "eval", variant))


def _compare_stage(preset, a, b, seed, encoder_stage, ex, est) -> Stage:
    c, e = preset.get("compare") or {}, preset.get("eval") or {}
    name = f"compare/{a}_vs_{b}_s{seed}"
    data, args = ex(c.get("data", e.get("data"))), [ex(x) for x in c.get("args") or []]
    enc_a, enc_b = encoder_stage[(a, seed)], encoder_stage[(b, seed)]

    def build(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "launch" / "eval.py"), "--checkpoint", str(_encoder_of(enc_a, out)),
                "--compare", str(_encoder_of(enc_b, out)), "--name", a, "--compare-name", b, "--data", data,
                "--tasks", c.get("tasks", "embedding"), "--out", str(out / name), "--no-progress", *args]

    return Stage(name, "compare", f"{a}_vs_{b}", seed, [enc_a, enc_b], build, _estimate(est, "compare", a))


def _vlm_stages(preset, variant, seed, encoder, ex, est) -> list[Stage]:
    v, m = preset["vlm"], preset.get("vmcbench") or {}
    tag = variant if seed == 0 else f"{variant}_s{seed}"
    s1, s2, score = f"vlm1/{tag}", f"vlm2/{tag}", f"vmcbench/{tag}"
    common = [ex(o) for o in v.get("overrides") or []]
    cfg1, cfg2 = ex(v["stage1"]), ex(v["stage2"])
    for cfg in (cfg1, cfg2):
        if not (ROOT / cfg).is_file() and not Path(cfg).is_file():
            raise PlanError(f"VLM config {cfg} does not exist")

    def stage1(out: Path) -> list[str]:
        return [*_argv(preset, "train_vlm.py", True), "--config", cfg1, f"model.vision={_encoder_of(encoder, out)}",
                f"run.dir={out / s1}", f"seed={seed}", "resume=auto", "logging.progress=false", *common,
                *[ex(o) for o in v.get("stage1_overrides") or []]]

    def stage2(out: Path) -> list[str]:
        return [*_argv(preset, "train_vlm.py", True), "--config", cfg2, f"model.vision={_encoder_of(encoder, out)}",
                f"model.projector_from={out / s1}", f"run.dir={out / s2}", f"seed={seed}", "resume=auto",
                "logging.progress=false", *common, *[ex(o) for o in v.get("stage2_overrides") or []]]

    def vmcbench(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "launch" / "eval_vmcbench.py"), "--model", str(newest_export(out / s2)),
                "--data", ex(m["data"]), "--out", str(out / score), "--name", tag, "--no-progress",
                *[ex(a) for a in m.get("args") or []]]

    return [Stage(s1, "vlm_stage1", variant, seed, [encoder], stage1, _estimate(est, "vlm_stage1", variant)),
            Stage(s2, "vlm_stage2", variant, seed, [s1], stage2, _estimate(est, "vlm_stage2", variant)),
            Stage(score, "vmcbench", variant, seed, [s2], vmcbench, _estimate(est, "vmcbench", variant))]


def _estimate(est: dict, kind: str, variant: str) -> float:
    value = est.get(kind, 60.0)
    if isinstance(value, dict):
        value = value.get(variant, max(value.values()) if value else 60.0)
    return float(value)


def fingerprint(argv: list[str], out: Path) -> str:
    """What makes a finished stage still valid: its command with OUT written as a placeholder (a moved folder
    keeps its stages) and the interpreter left out."""
    text = json.dumps([a.replace(str(out), "$OUT") for a in argv[1:]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]

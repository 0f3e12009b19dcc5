"""The cluster recipes (launch/cluster/, docs/cluster.md) stay runnable: shell syntax, DeepSpeed's hostfile parser,
every --config and key=value override they show loads through the config loader, and the GPU-hours estimate in
the doc is what benchmarks/gpu_hours_estimate.py prints now."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "cluster"
SBATCH = [CLUSTER / "pretrain.sbatch", CLUSTER / "vlm.sbatch"]
HOSTFILE = CLUSTER / "hostfile.example"
DOC = REPO / "docs" / "cluster.md"
ENTRY_POINTS = ("launch/pretrain.py", "launch/train_vlm.py")
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*=")
STOP = {"&", ";", "&&", "||", "|"}


def fenced(markdown: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    blocks, lang, body = [], None, []
    for line in markdown.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def code_blocks(markdown: str) -> str:
    return "\n".join(body for _, body in fenced(markdown))


def commented_lines(text: str) -> str:
    return "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))


def sources() -> dict[str, str]:
    """Shell text per file: the sbatch scripts whole, the doc's code blocks, the hostfile's comments."""
    out = {str(p.relative_to(REPO)): p.read_text() for p in SBATCH}
    out[str(DOC.relative_to(REPO))] = code_blocks(DOC.read_text())
    out[str(HOSTFILE.relative_to(REPO))] = commented_lines(HOSTFILE.read_text())
    return out


def launches(text: str) -> list[tuple[str, str, list[str]]]:
    """(entry point, --config value, overrides) of every command line that runs an entry point."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if not any(e in line for e in ENTRY_POINTS):
            continue
        tokens = shlex.split(line, comments=True)
        start = next((i for i, t in enumerate(tokens) if t in ENTRY_POINTS), None)
        if start is None:  # named in a comment or in prose
            continue
        args = []
        for token in tokens[start + 1:]:
            if token in STOP or token.endswith(";"):
                break
            args.append(token)
        config = args[args.index("--config") + 1]
        found.append((tokens[start], config, [a for a in args if OVERRIDE.match(a)]))
    return found


def sbatch_launches(text: str) -> list[tuple[str, str, list[str]]]:
    """The same for `sbatch ... launch/cluster/{pretrain,vlm}.sbatch` lines: CONFIG= / STAGE1_ARGS= / STAGE2_ARGS=
    before the script, overrides after it (pretraining), defaults from the scripts themselves."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if not re.search(r"launch/cluster/\w+\.sbatch", line):
            continue
        tokens = shlex.split(line, comments=True)
        env = dict(t.split("=", 1) for t in tokens if re.match(r"^[A-Z_0-9]+=", t))
        for i, token in enumerate(tokens):
            script = CLUSTER / Path(token).name
            if not token.startswith("launch/cluster/") or script not in SBATCH:
                continue
            own = script.read_text()
            if script.name == "pretrain.sbatch":
                config = env.get("CONFIG") or resolve("$CONFIG", own)
                found.append(("launch/pretrain.py", config, [t for t in tokens[i + 1:] if OVERRIDE.match(t)]))
            else:
                for stage in ("STAGE1", "STAGE2"):
                    config = env.get(f"{stage}_CONFIG") or resolve(f"${stage}_CONFIG", own)
                    found.append(("launch/train_vlm.py", config, env.get(f"{stage}_ARGS", "").split()))
    return found


def resolve(value: str, text: str) -> str:
    """A literal path, or "$NAME" with its default from `NAME=${NAME:-default}` in the same script."""
    if not value.startswith("$"):
        return value
    name = value.strip("${}")
    match = re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}", text, flags=re.M)
    assert match, f"{value}: no default assignment found"
    return match.group(1)


def test_sbatch_scripts_parse_and_keep_directives_first():
    for script in SBATCH:
        subprocess.run(["bash", "-n", str(script)], check=True)
        lines = script.read_text().splitlines()
        first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
        directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
        assert directives and max(directives) < first_command, f"{script.name}: #SBATCH after the first command"
        directives_text = "\n".join(line for line in lines if line.startswith("#SBATCH"))
        assert "--gpus-per-task" not in directives_text  # every rank opens cuda:LOCAL_RANK: it must see all GPUs
        assert "resume=auto" in script.read_text()


def test_hostfile_parses_with_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(HOSTFILE))
    assert pool and all(slots > 0 for slots in pool.values())
    # the .deepspeed_env lines it shows: KEY=VALUE only (DeepSpeed splits each line at its first "=")
    env_lines = [line.strip("# ").strip() for line in HOSTFILE.read_text().splitlines()
                 if re.match(r"^#\s+[A-Z_]+=", line)]
    assert env_lines and all(re.fullmatch(r"[A-Z_]+=\S+", line) for line in env_lines)


def test_every_config_and_override_loads():
    from train.config_loader import load_config
    from train.vlm_config import VLM_CHOICES, VLMConfig

    counts = {}
    for name, text in sources().items():
        for path in re.findall(r"launch/configs/[\w/]+\.yaml", text):
            assert (REPO / path).is_file(), f"{name}: {path} does not exist"
        found = launches(text) + sbatch_launches(text)
        counts[name] = len(found)
        for entry, config, overrides in found:
            config = resolve(config, text)
            assert (REPO / config).is_file(), f"{name}: --config {config} does not exist"
            overrides = [re.sub(r"\$\{?\w+\}?", "/placeholder", o) for o in overrides]
            kwargs = {"cls": VLMConfig, "choices": VLM_CHOICES} if entry.endswith("train_vlm.py") else {}
            cfg = load_config(REPO / config, overrides, **kwargs)  # unknown keys and bad types raise
            assert cfg.run.dir
    assert counts == {"launch/cluster/pretrain.sbatch": 1, "launch/cluster/vlm.sbatch": 2, "docs/cluster.md": 9,
                      "launch/cluster/hostfile.example": 2}, counts


def test_inline_overrides_in_the_doc_are_config_keys():
    from train.config import PretrainConfig
    from train.config_loader import all_keys
    from train.vlm_config import VLMConfig

    keys = set(all_keys(PretrainConfig)) | set(all_keys(VLMConfig))
    top = {key.split(".")[0] for key in keys}  # spans naming anything else (a DeepSpeed argument) are not overrides
    spans = [s for s in re.findall(r"`([^`\n]+)`", DOC.read_text())
             if OVERRIDE.match(s) and s.split("=")[0].split(".")[0] in top]
    assert len(spans) >= 5
    for span in spans:
        key = span.split("=", 1)[0]
        assert key in keys, f"docs/cluster.md: `{span}`: {key} is not a config key"


def test_gpu_hours_estimate_matches_the_doc():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_hours_estimate.py")], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout
    assert out.startswith("ASSUMED MFU 40%") and "vitb16_dino_datacomp10m.yaml" in out and "stage 2" in out
    block = next(body for _, body in fenced(DOC.read_text())
                 if body.startswith("$ python benchmarks/gpu_hours_estimate.py"))
    assert block.split("\n", 1)[1].strip() == out.strip(), "docs/cluster.md's table differs from the script's output"


@pytest.mark.parametrize("line", ["[docs/cluster.md](docs/cluster.md)"])
def test_readme_points_to_the_doc(line):
    assert line in (REPO / "README.md").read_text()

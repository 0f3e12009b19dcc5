"""Config loading: extends, overrides, typo suggestions, type errors, the shipped configs, diffs."""
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import PretrainConfig
from train.config_loader import ConfigError, diff_configs, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs" / "pretrain"
OBJECTIVES = ["clip", "siglip", "dino", "clip_frozen_text", "hybrid"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.1\n  weight_decay: 0.3\nschedule:\n  global_batch: 32\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\noptim:\n  lr: 0.2\n")
    cfg = load_config(child, ["optim.weight_decay=1e-3", "schedule.steps=7", "data.train=a/{0..3}.tar", "seed=3"])
    assert cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 0.001 and cfg.schedule.global_batch == 32
    assert cfg.schedule.steps == 7 and cfg.data.train == "a/{0..3}.tar" and cfg.seed == 3
    assert isinstance(cfg.optim.lr, float)


def test_yaml_corner_cases(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  embed_dim: 64\noptim:\n  lr: 0.1\n")
    write(tmp_path / "left.yaml", "extends: base.yaml\noptim:\n  weight_decay: 0.5\n")
    write(tmp_path / "right.yaml", "extends: base.yaml\nschedule:\n  global_batch: 8\n")
    diamond = write(tmp_path / "diamond.yaml", "extends: [left.yaml, right.yaml]\n")  # a shared base: no cycle
    cfg = load_config(diamond)
    assert cfg.model.embed_dim == 64 and cfg.optim.weight_decay == 0.5 and cfg.schedule.global_batch == 8
    empty = write(tmp_path / "empty.yaml", "extends: base.yaml\nmodel:\n  # embed_dim: 32\noptim:\n  lr: 1e-3\n")
    cfg = load_config(empty)  # an empty section keeps the inherited one; `1e-3` in a file is a float
    assert cfg.model.embed_dim == 64 and cfg.optim.lr == 0.001
    cfg = load_config(None, ["run.name=0123", "run.dir=runs/1:30", "logging.wandb_project=off", "optim.lr=1e-3"])
    assert (cfg.run.name, cfg.run.dir, cfg.logging.wandb_project, cfg.optim.lr) == ("0123", "runs/1:30", "off", 0.001)
    assert load_config(None, ["run.name=2024-01-05"]).run.name == "2024-01-05"


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["optim.lrr=1"])
    bad = write(tmp_path / "bad.yaml", "schedule:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'schedule.steps'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):  # right key, wrong section
        load_config(None, ["lr=1"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"config key 'optim.lr' expects float, got str 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'schedule.global_batch' expects int"):
        load_config(None, ["schedule.global_batch=2.5"])
    with pytest.raises(ConfigError, match=r"'objective.name' must be one of .* \(did you mean 'dino'\?\)"):
        load_config(None, ["objective.name=dinoo"])
    with pytest.raises(ConfigError, match="list"):
        load_config(None, ["optim.betas=0.9"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_env_vars_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARD_ROOT", "/data/dc")
    assert load_config(None, ["data.train=${SHARD_ROOT}/{0..1}.tar"]).data.train == "/data/dc/{0..1}.tar"


@pytest.mark.parametrize("family", ["tiny", "vitb16"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_shipped_configs_load(family, objective, tmp_path):
    name = f"{family}_{objective}.yaml" if family == "tiny" else f"vitb16_{objective}_datacomp10m.yaml"
    path = CONFIGS / name
    header = path.read_text().splitlines()[:6]
    assert any("launch/pretrain.py" in line for line in header), "each config's header gives its launch command"
    cfg = load_config(path)
    assert cfg.objective.name == objective
    save_config(cfg, tmp_path / "c.yaml")  # the merged config round-trips
    assert load_config(tmp_path / "c.yaml") == cfg


# Each objective keeps its reference code's init of the same architecture (open_clip vs DINO: docs/recipes.md)
OBJECTIVE_OWN_VISION_KEYS = ("model.vision.drop_path", "model.vision.init", "model.vision.norm_eps",
                             "model.vision.patch_bias")


@pytest.mark.parametrize("family", ["tiny", "vitb16"])
def test_controlled_comparison_shares_the_base(family):
    """Only objective-specific sections may differ between CLIP and DINO: never backbone, data, batch, schedule."""
    name = (lambda o: f"tiny_{o}.yaml") if family == "tiny" else (lambda o: f"vitb16_{o}_datacomp10m.yaml")
    clip = load_config(CONFIGS / name("clip"))
    for other in OBJECTIVES[1:]:
        rows = diff_configs(clip, load_config(CONFIGS / name(other)))
        shared = [k for k, _, _ in rows if k.split(".")[0] in ("data", "schedule", "deepspeed")
                  or k.startswith("model.vision.") and k not in OBJECTIVE_OWN_VISION_KEYS]
        assert shared == [], f"{other} differs from clip in shared settings: {shared}"


def test_diff_configs_cli(repo_root):
    out = subprocess.run([sys.executable, "launch/diff_configs.py", "launch/configs/pretrain/tiny_clip.yaml",
                          "launch/configs/pretrain/tiny_dino.yaml"], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "objective.name" in out.stdout and "clip" in out.stdout and "dino" in out.stdout
    assert "schedule.global_batch" not in out.stdout
    bad = subprocess.run([sys.executable, "launch/diff_configs.py", "nope.yaml", "launch/configs/pretrain/tiny_dino.yaml"],
                         cwd=repo_root, capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_defaults_are_valid():
    assert isinstance(load_config(None), PretrainConfig)

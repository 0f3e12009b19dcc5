"""Shared test setup: offline hubs, CPU-only DeepSpeed, deterministic torch."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides interpreter vs compiler when it is first imported (deepspeed and others may import it early):
# on these CPU machines the loss kernels run in its interpreter (kernels/triton_runtime.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def triton_interpreter():
    """The Triton kernels in the interpreter for a test module (skipped without triton); the env is restored."""
    from kernels.triton_runtime import triton_installed, use_interpreter

    if not triton_installed():
        pytest.skip("triton is not installed")
    before = os.environ.get("TRITON_INTERPRET")
    use_interpreter()  # before triton is first imported
    yield
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


# ----------------------------------------------------------------------------- tiny training runs
TINY_OVERRIDES = [
    "model.vision.size=micro", "model.vision.patch_size=8", "model.vision.image_size=32",
    "model.text.width=32", "model.text.heads=2", "model.text.layers=1", "model.text.context_length=24",
    "model.embed_dim=32", "model.dino_head.out_dim=256", "model.dino_head.hidden_dim=64",
    "model.dino_head.bottleneck_dim=32", "dino.global_crop_size=32", "dino.local_crop_size=16", "dino.n_local_crops=2",
    "schedule.global_batch=16", "schedule.warmup_steps=2", "data.workers=2", "data.shuffle_buffer=32",
    "data.generate_synthetic=false", "logging.progress=false", "logging.wandb=disabled", "checkpoint.keep=2",
    "model.frozen_text.max_length=16",
]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A 320-sample synthetic world at 32 px in 16 shards, with a trained caption tokenizer."""
    from data.synthetic import generate_world
    from data.tokenizer import read_captions, train_tokenizer
    from data.shards import expand_shards

    out = tmp_path_factory.mktemp("tiny_world")
    generate_world(out, samples=320, val_samples=32, shard_size=20, image_size=32, seed=0, workers=2, progress=False)
    train_tokenizer(read_captions(expand_shards(str(out / "train-*.tar"))), str(out / "tokenizer"), 300)
    return out


def tiny_overrides(world: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"data.train={world}/train-{{000000..000015}}.tar",
            f"data.tokenizer={world}/tokenizer.model", f"run.dir={run_dir}", *extra]

"""The trainer in-process (1 rank): non-finite losses and gradients (and one 2-rank run: a NaN on one rank only),
crashes during a checkpoint save, non-finite weights never reaching a checkpoint, wandb modes."""
import pytest
import torch

from conftest import tiny_overrides
from train import checkpoint as ckpt
from train.config_loader import load_config
from train.objectives.contrastive import ContrastiveObjective
from train.plots import read_jsonl
from models.vit import VisionTransformer
from train.trainer import NonFiniteLossError, train

CONFIG = "launch/configs/pretrain/tiny_clip.yaml"


def config(world, run_dir, *extra):
    return load_config(CONFIG, tiny_overrides(world, run_dir, "data.workers=1", *extra))


def optimizer_state(engine) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the optimizer's state, in order: Adam's moments and step counts (ZeRO's wrapped AdamW too)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [(k, v.detach().clone()) for state in inner.state.values() for k, v in state.items() if torch.is_tensor(v)]


def same(a: list, b: list) -> bool:
    """Two snapshots (lists of tensors, or of (name, tensor)) hold the same tensors, bitwise."""
    unpack = lambda x: x if torch.is_tensor(x) else x[1]  # noqa: E731
    return (len(a) == len(b) and all(torch.is_tensor(x) or x[0] == y[0] for x, y in zip(a, b))
            and all(torch.equal(unpack(x), unpack(y)) for x, y in zip(a, b)))


@pytest.fixture
def nan_at(monkeypatch):
    """Make the loss NaN at the given 0-based steps (or micro-step calls), recording the weights and the optimizer
    state seen at each call."""
    calls = {"steps": set(), "calls": set(), "snapshots": [], "adam": [], "n": 0}
    original = ContrastiveObjective.compute_loss

    def compute_loss(self, student, batch, step):
        calls["snapshots"].append([p.detach().clone() for p in self.student.parameters()])
        calls["adam"].append(optimizer_state(student))  # student: the DeepSpeed engine
        terms = original(self, student, batch, step)
        if step in calls["steps"] or calls["n"] in calls["calls"]:
            terms["loss"] = terms["loss"] * float("nan")
        calls["n"] += 1
        return terms

    monkeypatch.setattr(ContrastiveObjective, "compute_loss", compute_loss)
    return calls


def test_skip_nonfinite_step_and_continue(tiny_world, tmp_path, nan_at):
    nan_at["steps"] = {2}
    summary = train(config(tiny_world, tmp_path, "schedule.steps=5", "checkpoint.every=1"))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_update"] for r in rows] == [False, False, True, False, False]
    assert summary["nonfinite_total"] == 1 and rows[-1]["nonfinite_total"] == 1
    snaps = nan_at["snapshots"]
    assert all(torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))  # the skipped step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))
    done = [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")]
    assert done == ["step_0000004", "step_0000005"]  # no checkpoint for the skipped step 3


def test_skip_with_gradient_accumulation(tiny_world, tmp_path, nan_at):
    nan_at["calls"] = {5}  # second micro-batch of step 3 (2 micro-batches per step)
    summary = train(config(tiny_world, tmp_path, "schedule.steps=4", "schedule.micro_batch=8", "checkpoint.every=0"))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_update"] for r in rows] == [False, False, True, False] and summary["nonfinite_total"] == 1
    snaps = nan_at["snapshots"]  # one per micro-batch
    assert all(torch.equal(a, b) for a, b in zip(snaps[4], snaps[6]))  # weights before and after step 3 agree


@pytest.mark.parametrize("zero_stage,micro_batch,bad_calls", [(0, 16, {2}), (0, 8, {4}), (0, 8, {5}), (2, 16, {2}),
                                                           (2, 8, {5})])
def test_a_skipped_step_leaves_weights_and_adam_state_untouched(tiny_world, tmp_path, nan_at, zero_stage, micro_batch,
                                                               bad_calls):
    """The device-side flag, read once per step: a NaN in any micro-batch of step 3 (1 or 2 micro-batches a step,
    ZeRO 0 and 2) holds every parameter group, so the step changes no weight, no Adam moment, no step count (with
    accumulation the old LR-0 step moved the moments)."""
    nan_at["calls"] = bad_calls
    accum = 16 // micro_batch
    summary = train(config(tiny_world, tmp_path, "schedule.steps=4", f"schedule.micro_batch={micro_batch}",
                           "checkpoint.every=0", f"deepspeed.zero_stage={zero_stage}"))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_update"] for r in rows] == [False, False, True, False] and summary["nonfinite_total"] == 1
    snaps, adam = nan_at["snapshots"], nan_at["adam"]  # one per micro-batch, before its forward
    before, after = 2 * accum, 3 * accum  # the first micro-batch of step 3 and of step 4
    assert same(snaps[before], snaps[after]) and same(adam[before], adam[after])
    assert not same(adam[accum], adam[before]) and not same(snaps[accum], snaps[before])  # a good step does move them
    steps = [float(v) for k, v in adam[after] if k == "step"]  # AdamW's per-parameter (ZeRO: per-group) counts
    assert steps and set(steps) == {2.0}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_gradients_of_a_finite_loss_are_skipped(tiny_world, tmp_path, monkeypatch, capsys, zero_stage):
    """ZeRO 0: the trainer's gradient check (in the same sync); ZeRO 1-3: DeepSpeed's own gradient-norm check, which
    skips the update itself; either way the step is counted as skipped, its weights and Adam state untouched."""
    original = ContrastiveObjective.compute_loss
    seen = []

    def compute_loss(self, student, batch, step):
        seen.append(([p.detach().clone() for p in self.student.parameters()], optimizer_state(student)))
        terms = original(self, student, batch, step)
        if step == 1:  # sqrt at 0: the loss gains exactly 0 (stays finite), the gradient is inf * 0 = NaN
            terms["loss"] = terms["loss"] + torch.sqrt(self.student.visual.cls_token.sum() * 0.0)
        return terms

    monkeypatch.setattr(ContrastiveObjective, "compute_loss", compute_loss)
    summary = train(config(tiny_world, tmp_path, "schedule.steps=3", "checkpoint.every=1",
                           f"deepspeed.zero_stage={zero_stage}"))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped_update"] for r in rows] == [False, True, False] and summary["nonfinite_total"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "non-finite gradients at step 2" in capsys.readouterr().out
    assert same(seen[1][0], seen[2][0]) and same(seen[1][1], seen[2][1])
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == ["step_0000001", "step_0000003"]


NAN_ON_RANK_1 = """
import os, runpy, sys
sys.path.insert(0, {launch!r})
from train.distributed import prepare_environment
prepare_environment()
from train.objectives.contrastive import ContrastiveObjective
original = ContrastiveObjective.compute_loss
def compute_loss(self, student, batch, step):
    terms = original(self, student, batch, step)
    if step == 2 and os.environ.get("RANK") == "1":
        terms["loss"] = terms["loss"] * float("nan")
    return terms
ContrastiveObjective.compute_loss = compute_loss
runpy.run_path({script!r}, run_name="__main__")
"""


def _tensors(obj, path=""):
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _tensors(x, f"{path}/{i}")


@pytest.mark.distributed
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tiny_world, tmp_path):
    """2 DeepSpeed CPU ranks at ZeRO-2, a NaN loss on rank 1 only at step 3: both ranks hold the step, and the
    checkpoint written after it (schedule.stop_after saves a skipped step) has every weight and every rank's
    optimizer partition (moments, step counts) equal to the one before it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO
    from test_train_e2e import free_port

    wrapper = tmp_path / "nan_on_rank_1.py"
    wrapper.write_text(NAN_ON_RANK_1.format(launch=str(REPO / "launch"), script=str(REPO / "launch" / "pretrain.py")))
    run = tmp_path / "run"
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(wrapper), "--config", str(REPO / CONFIG),
           *tiny_overrides(tiny_world, run, "data.workers=1", "schedule.steps=4", "schedule.stop_after=3",
                           "checkpoint.every=1", "deepspeed.zero_stage=2")]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "non-finite loss at step 3 on at least one rank" in out.stdout
    assert [r["skipped_update"] for r in read_jsonl(run / "metrics.jsonl")] == [False, False, True]
    a, b = run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000003"
    files = sorted(p.name for p in a.glob("*_states.pt"))
    assert any("optim_states" in f for f in files) and files == sorted(p.name for p in b.glob("*_states.pt"))
    for name in files:
        ta = list(_tensors(torch.load(a / name, map_location="cpu", weights_only=False)))
        tb = list(_tensors(torch.load(b / name, map_location="cpu", weights_only=False)))
        assert ta and [k for k, _ in ta] == [k for k, _ in tb], name
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ta, tb)), name


def test_stop_after_on_a_skipped_step_still_saves(tiny_world, tmp_path, nan_at):
    nan_at["steps"] = {2}
    train(config(tiny_world, tmp_path, "schedule.steps=6", "checkpoint.every=0", "schedule.stop_after=3"))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == ["step_0000003"]


def test_rollback_sets_newer_checkpoints_aside(tiny_world, tmp_path):
    train(config(tiny_world, tmp_path, "schedule.steps=4", "checkpoint.every=2", "checkpoint.keep=2"))
    line = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(line)] == ["step_0000002", "step_0000004"]
    exports = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exports == ["step_0000002", "step_0000004"]
    (tmp_path / "evals.jsonl").write_text('{"step": 2, "export": "step_0000002", "status": "ok"}\n'
                                          '{"step": 4, "export": "step_0000004", "status": "ok"}\n')
    train(config(tiny_world, tmp_path, "schedule.steps=4", "checkpoint.every=3", "checkpoint.keep=2",
                 f"resume={line / 'step_0000002'}", "schedule.stop_after=3"))
    # the resumed line's step 3 is kept (not pruned in favour of the abandoned step 4), and resume=auto finds it
    assert [p.name for p in ckpt.complete_checkpoints(line)] == ["step_0000002", "step_0000003"]
    assert ckpt.find_resume_checkpoint("auto", line).name == "step_0000003"
    assert [p.name.rsplit("_", 1)[0] for p in line.glob("abandoned_*")] == ["abandoned_step_0000004"]
    # the abandoned line's export and its evaluation go too: the watcher evaluates the new line's step 4
    assert sorted(p.name for p in (tmp_path / "export").glob("step_*")) == ["step_0000002", "step_0000003"]
    assert [p.name.rsplit("_", 1)[0] for p in (tmp_path / "export").glob("abandoned_*")] == ["abandoned_step_0000004"]
    assert '"step_0000004"' not in (tmp_path / "evals.jsonl").read_text()
    assert '"step_0000004"' in (tmp_path / "evals_abandoned.jsonl").read_text()


@pytest.mark.parametrize("objective", ["dino", "hybrid"])
def test_grad_checkpointing_reaches_every_student(tiny_world, tmp_path, objective):
    from train.objectives.registry import build_objective

    cfg = load_config(f"launch/configs/pretrain/tiny_{objective}.yaml",
                      tiny_overrides(tiny_world, tmp_path, "model.vision.grad_checkpointing=true"))
    student = build_objective(cfg, 10, 10).student
    student.set_grad_checkpointing(True)  # what the trainer calls
    vits = [m for m in student.modules() if isinstance(m, VisionTransformer)]
    assert vits and all(v.grad_checkpointing for v in vits)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_logit_scale_clamp_reaches_deepspeeds_master_copy(monkeypatch, zero_stage):
    """ZeRO 1-3 write an fp32 master copy over the weights each step: the clamp must hold there too (2 ranks with a
    padded ZeRO-3 partition: tests/test_train_e2e.py::test_two_rank_deepspeed_run)."""
    import math

    import deepspeed

    from models.clip import CLIP
    from models.text import TextTowerConfig, TextTransformer
    from models.vit import ViTConfig
    from train.distributed import init_distributed

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    init_distributed()
    torch.manual_seed(0)
    clip = CLIP(VisionTransformer(ViTConfig(size="micro", patch_size=8, image_size=16)),
                TextTransformer(TextTowerConfig(vocab_size=20, width=32, heads=2, layers=1, context_length=4)),
                embed_dim=8, init_logit_scale=4.5)
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 2 ** 31 - 1, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=clip, optimizer=torch.optim.SGD(clip.parameters(), lr=0.001),
                                      config=config, dist_init_required=False)
    images, tokens = torch.randn(1, 3, 16, 16), torch.randint(0, 20, (1, 4))

    def logit_scale() -> float:  # ZeRO-3 keeps only a partition outside the forward
        with deepspeed.zero.GatheredParameters([clip.logit_scale]):
            return clip.logit_scale.item()

    before_clamp = []
    for _ in range(4):
        engine.backward(-engine(images, tokens)["logit_scale"])  # always pushes the scale up, ~0.09 per step
        engine.step()
        before_clamp.append(logit_scale())
        clip.clamp_logit_scale_()
    assert logit_scale() == pytest.approx(math.log(100.0))
    assert max(before_clamp) < math.log(100.0) + 0.11  # each step starts again from the clamped value


def test_stop_after_patience(tiny_world, tmp_path, nan_at):
    nan_at["steps"] = set(range(100))
    with pytest.raises(NonFiniteLossError, match="3 in a row"):
        train(config(tiny_world, tmp_path, "schedule.steps=10", "checkpoint.every=1", "nonfinite_patience=3"))
    assert ckpt.complete_checkpoints(tmp_path / "checkpoints") == []
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2  # the third raises before it is logged


def test_halt(tiny_world, tmp_path, nan_at):
    nan_at["steps"] = {1}
    with pytest.raises(NonFiniteLossError, match="nonfinite=halt"):
        train(config(tiny_world, tmp_path, "schedule.steps=5", "checkpoint.every=1", "nonfinite=halt"))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == ["step_0000001"]


def test_nan_weights_are_never_checkpointed(tiny_world, tmp_path, monkeypatch):
    original = ContrastiveObjective.after_step

    def poison(self, step):
        if step == 1:
            with torch.no_grad():
                self.student.visual.cls_token.fill_(float("nan"))
        return original(self, step)

    monkeypatch.setattr(ContrastiveObjective, "after_step", poison)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        train(config(tiny_world, tmp_path, "schedule.steps=4", "checkpoint.every=1"))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == ["step_0000001"]
    assert not (tmp_path / "export" / "step_0000002").exists()


def test_crash_during_save_keeps_the_previous_checkpoint(tiny_world, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(config(tiny_world, straight, "schedule.steps=6", "checkpoint.every=2"))
    run = tmp_path / "crashy"
    real_write = ckpt._write_atomic

    def crash_at_step_4(path, text):
        if "step_0000004" in str(path):
            raise KeyboardInterrupt("simulated kill during the save of step 4")
        real_write(path, text)

    monkeypatch.setattr(ckpt, "_write_atomic", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_world, run, "schedule.steps=6", "checkpoint.every=2"))
    monkeypatch.setattr(ckpt, "_write_atomic", real_write)
    assert (run / "checkpoints" / "step_0000004").is_dir()  # the partial save is there ...
    assert ckpt.find_resume_checkpoint("auto", run / "checkpoints").name == "step_0000002"  # ... and ignored
    train(config(tiny_world, run, "schedule.steps=6", "checkpoint.every=2", "resume=auto"))
    a = {r["step"]: r["loss"] for r in read_jsonl(straight / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}
    assert b == a


def test_wandb_modes(tiny_world, tmp_path, monkeypatch):
    from train.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"  # no API key: never try to reach the service
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online" and wandb_mode("disabled") == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    train(config(tiny_world, tmp_path, "schedule.steps=2", "checkpoint.every=0", "logging.wandb=auto"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_init_from_an_export_and_resume_wins(tiny_world, tmp_path):
    from models.export import load_export

    train(config(tiny_world, tmp_path / "clip", "schedule.steps=2", "checkpoint.every=0"))
    source = tmp_path / "clip" / "export" / "step_0000002"
    dino_cfg = load_config("launch/configs/pretrain/tiny_dino.yaml", tiny_overrides(
        tiny_world, tmp_path / "dino", "data.workers=1", "schedule.steps=1", "checkpoint.every=0", "optim.lr=0",
        f"model.init_from={source}"))
    train(dino_cfg)  # lr 0: the student stays at the CLIP image tower, and so does the EMA teacher (to rounding)
    clip_model, _ = load_export(source)
    teacher, _ = load_export(tmp_path / "dino" / "export" / "step_0000001")
    pairs = list(zip(clip_model.visual.state_dict().values(), teacher.state_dict().values()))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in pairs)
    fresh = VisionTransformer(teacher.cfg).state_dict()  # and that is not what a fresh init gives
    assert not all(torch.allclose(a, b) for a, b in zip(fresh.values(), teacher.state_dict().values()))
    wrong = load_config(CONFIG, tiny_overrides(tiny_world, tmp_path / "bad", "model.vision.size=tiny",
                                               f"model.init_from={source}"))
    with pytest.raises(ValueError, match="architecture differs"):
        train(wrong)

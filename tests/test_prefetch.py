"""train/prefetch.py: the CPU pass-through, the one-batch-ahead bookkeeping (run on the CPU with `ahead_on_cpu`:
the same code path CUDA takes, without streams), exact resume with a held batch, and batch structures."""
import time

import pytest
import torch

from conftest import tiny_overrides
from data.loader import Batch
from data.vlm_data import VLMBatch
from train.prefetch import DevicePrefetcher, map_tensors, tensors_of


class CountingLoader:
    """An endless stream of numbered batches with the loaders' state_dict (batches handed out)."""

    def __init__(self, delay: float = 0.0):
        self.batches, self.delay = 0, delay

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]

    def __iter__(self):
        while True:
            time.sleep(self.delay)
            n = self.batches
            self.batches += 1  # as PretrainLoader / VLMLoader: the position moves when a batch is handed out
            yield Batch(keys=[f"k{n}"], images=torch.full((1, 3, 2, 2), float(n)), tokens=torch.tensor([[n, n]]),
                        crops=[torch.zeros(1, 3, 2, 2) + n], position=(0, n + 1))


def numbers(batches):
    return [int(b.images.flatten()[0]) for b in batches]


def test_cpu_pass_through_keeps_order_and_the_tensors():
    loader = CountingLoader()
    pre = DevicePrefetcher(loader, torch.device("cpu"))
    assert not pre.ahead and loader.batches == 0  # nothing is read before the first next()
    got = [pre.next() for _ in range(5)]
    assert numbers(got) == [0, 1, 2, 3, 4] and loader.batches == 5  # nothing held
    assert pre.state_dict() == {"batches": 5}
    assert got[2].keys == ["k2"] and got[2].position == (0, 3) and got[2].crops[0].flatten()[0] == 2


def test_ahead_holds_one_batch_and_refuses_a_state_dict_meanwhile(monkeypatch):
    monkeypatch.setattr(DevicePrefetcher, "ahead_on_cpu", True)
    loader = CountingLoader()
    pre = DevicePrefetcher(loader, torch.device("cpu"))
    assert numbers([pre.next()]) == [0] and loader.batches == 2  # batch 1 is held
    with pytest.raises(RuntimeError, match="held"):
        pre.state_dict()
    assert numbers([pre.next(ahead=False)]) == [1] and loader.batches == 2  # handed out; nothing held now
    assert pre.state_dict() == {"batches": 2}
    assert numbers([pre.next(), pre.next()]) == [2, 3]  # fetches again on demand


def test_resume_from_a_state_saved_between_batches_is_exact(monkeypatch):
    monkeypatch.setattr(DevicePrefetcher, "ahead_on_cpu", True)
    straight = DevicePrefetcher(CountingLoader(), torch.device("cpu"))
    expected = numbers([straight.next() for _ in range(8)])
    first = DevicePrefetcher(CountingLoader(), torch.device("cpu"))
    got = numbers([first.next() for _ in range(4)] + [first.next(ahead=False)])  # the trainer before a checkpoint
    state = first.state_dict()
    loader = CountingLoader()
    loader.load_state_dict(state)
    second = DevicePrefetcher(loader, torch.device("cpu"))
    got += numbers([second.next() for _ in range(3)])
    assert got == expected == list(range(8))


def test_data_wait_counts_the_host_wait_for_the_loader():
    pre = DevicePrefetcher(CountingLoader(delay=0.05), torch.device("cpu"))
    pre.reset_wait()
    pre.next()
    pre.next()
    assert pre.wait_s() >= 0.1
    pre.reset_wait()
    assert pre.wait_s() == 0.0


def test_map_tensors_keeps_every_batch_structure():
    vlm = VLMBatch(["a", "b"], torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                   torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, 4, 4), torch.tensor([True, False]), {"x": 1})
    doubled = map_tensors(vlm, lambda t: t * 2)
    assert isinstance(doubled, VLMBatch) and doubled.ids == ["a", "b"] and doubled.skipped == {"x": 1}
    assert torch.equal(doubled.input_ids, torch.full((2, 3), 2)) and doubled.has_image.dtype == torch.long
    assert len(list(tensors_of(vlm))) == 5
    batch = next(iter(CountingLoader()))
    assert len(list(tensors_of(batch))) == 3  # images, tokens, one crop (None fields skipped)
    raw = map_tensors({"a": [torch.ones(1), (torch.ones(1), "s")], "b": 3}, lambda t: t + 1)
    assert raw["a"][0].item() == 2 and raw["a"][1][1] == "s" and raw["b"] == 3


def test_training_with_a_batch_held_ahead_resumes_exactly(tiny_world, tmp_path, monkeypatch):
    """The trainer with the CUDA bookkeeping on the CPU (one batch ahead, none across a checkpoint): 4 straight steps
    and 2 + stop + resume + 2 give the same losses, with gradient accumulation (2 micro-batches a step)."""
    from train.config_loader import load_config
    from train.plots import read_jsonl
    from train.trainer import train

    monkeypatch.setattr(DevicePrefetcher, "ahead_on_cpu", True)
    common = ["data.workers=1", "schedule.steps=4", "checkpoint.every=3", "schedule.micro_batch=8"]

    def run(run_dir, *extra):
        cfg = load_config("launch/configs/pretrain/tiny_clip.yaml", tiny_overrides(tiny_world, run_dir, *common, *extra))
        train(cfg)
        return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", "schedule.stop_after=2")
    resumed = run(tmp_path / "split", "resume=auto")
    assert sorted(straight) == [1, 2, 3, 4] and resumed == straight
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert all(r["data_wait_s"] >= 0 for r in rows)

"""LLaVA's modality-length grouped sampler (seeded) and the VLM loader's exact resume."""
import json
from pathlib import Path

import pytest
import torch

from data.vlm_sampler import modality_grouped_order, rank_batches


def _lengths(n_mm: int = 50, n_lang: int = 14, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    mm = torch.randint(1, 200, (n_mm,), generator=g).tolist()
    lang = (-torch.randint(1, 200, (n_lang,), generator=g)).tolist()
    mixed = mm + lang
    order = torch.randperm(len(mixed), generator=g).tolist()
    return [mixed[i] for i in order]


def test_order_is_a_permutation_and_deterministic():
    lengths = _lengths()
    a = modality_grouped_order(lengths, micro=4, groups=2, seed=3, epoch=0)
    assert sorted(a) == list(range(len(lengths)))
    assert a == modality_grouped_order(lengths, micro=4, groups=2, seed=3, epoch=0)
    assert a != modality_grouped_order(lengths, micro=4, groups=2, seed=3, epoch=1)
    assert a != modality_grouped_order(lengths, micro=4, groups=2, seed=4, epoch=0)


def test_micro_batches_do_not_mix_modalities_except_the_tail():
    lengths = _lengths(64, 24)
    micro, groups = 4, 2
    order = modality_grouped_order(lengths, micro, groups, seed=0, epoch=0)
    size = micro * groups
    tail_start = len(order) - ((64 % size or size) + (24 % size or size))
    mixed = [i for i in range(0, tail_start, micro) if len({lengths[j] > 0 for j in order[i:i + micro]}) > 1]
    assert not mixed


def test_megabatch_chunks_are_length_sorted_and_balanced():
    """Inside a megabatch the longest samples are dealt first, greedily to the lightest chunk (LLaVA)."""
    lengths = [10, 1, 9, 2, 8, 3, 7, 4]
    order = modality_grouped_order(lengths, micro=2, groups=4, seed=0, epoch=0)
    chunks = [order[i:i + 2] for i in range(0, 8, 2)]
    totals = sorted(sum(lengths[j] for j in c) for c in chunks)
    assert totals == [11, 11, 11, 11]


def test_ranks_split_the_epoch_and_get_equal_counts():
    lengths = _lengths(61, 13)
    world, micro, accum = 2, 3, 2
    per_rank = [rank_batches(lengths, micro, world, accum, seed=1, epoch=0, rank=r) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(lengths) // (micro * world)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # each sample at most once per epoch
    assert all(len(b) == micro for batches in per_rank for b in batches)


def test_zero_length_is_refused():
    with pytest.raises(ValueError, match="non-zero"):
        modality_grouped_order([3, 0, -2], 1, 1, 0, 0)


@pytest.fixture(scope="module")
def tiny_vlm_inputs(tmp_path_factory):
    from vlm_fixtures import make_encoder_export, make_llava_data

    out = tmp_path_factory.mktemp("vlm_loader")
    return make_encoder_export(out / "encoder"), make_llava_data(out / "data", records=20, text_only=6)


def _loader(encoder, data, workers=0, rank=0, world=1):
    from data.conversation import get_template
    from data.vlm_data import ConversationDataset, modality_lengths, read_records
    from data.vlm_loader import VLMLoader
    from models.vlm import build_llava

    model, processor = build_llava(str(encoder), "tiny-llama", template="vicuna_v1")
    records, root = read_records(str(data["stage2"]))
    dataset = ConversationDataset(records, root, processor, get_template("vicuna_v1"), model.config.image_seq_length,
                                  512)
    return VLMLoader(dataset, modality_lengths(records), micro=2, world=world, accum=1, rank=rank, seed=0,
                     workers=workers, pad_id=processor.tokenizer.pad_token_id)


def test_loader_resumes_exactly_across_an_epoch_boundary(tiny_vlm_inputs):
    encoder, data = tiny_vlm_inputs
    straight = _loader(encoder, data, workers=2)
    it = iter(straight)
    reference = [next(it) for _ in range(16)]  # 13 batches per epoch: crosses into epoch 1
    first = _loader(encoder, data)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # it goes through a checkpoint
    resumed = _loader(encoder, data, workers=2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for ref in reference[7:]:
        got = next(it)
        assert got.ids == ref.ids
        assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.labels, ref.labels)
        assert torch.equal(got.pixel_values, ref.pixel_values)
    text_only = [b for b in reference if not b.has_image.any()]
    assert text_only and all(b.pixel_values.abs().sum() == 0 for b in text_only)


def test_loader_refuses_a_changed_batch_setting(tiny_vlm_inputs):
    from data.shards import DataError

    encoder, data = tiny_vlm_inputs
    state = _loader(encoder, data).state_dict()
    other = _loader(encoder, data, world=2)
    with pytest.raises(DataError, match="world"):
        other.load_state_dict(state)


def test_bad_samples_are_skipped_counted_and_capped(tiny_vlm_inputs, tmp_path):
    from data.shards import DataError

    encoder, data = tiny_vlm_inputs
    records = json.loads(Path(data["stage2"]).read_text())
    records[0]["image"] = "missing.png"
    records[1]["conversations"][0]["value"] = "no image token here"  # has an image, no placeholder
    (tmp_path / "images").symlink_to(data["images"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    loader = _loader(encoder, {"stage2": bad})
    it = iter(loader)
    for _ in range(13):
        next(it)
    assert loader.skipped == {"missing_image": 1, "image_count": 1}
    loader.max_skipped = 1
    with pytest.raises(DataError, match="data.max_skipped"):
        for _ in range(20):
            next(it)


def test_malformed_json_names_the_place(tmp_path):
    from data.shards import DataError
    from data.vlm_data import read_records

    (tmp_path / "a.json").write_text('[{"id": "x", "conversations": [')
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        read_records(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text('[{"id": "y", "conversations": [{"from": "robot", "value": "hi"}]}]')
    with pytest.raises(DataError, match=r"b.json\[0\] \(id 'y'\)"):
        read_records(str(tmp_path / "b.json"))
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "c.json"))


def test_shards_carry_the_same_records_as_the_json(tmp_path):
    """The synthetic instruction data written both ways reads back to the same records and image bytes."""
    from data.vlm_data import read_records
    from data.vlm_synthetic import ensure_vlm_data

    paths = ensure_vlm_data(tmp_path, stage1_samples=12, stage2_samples=21, val_questions=7, test_questions=7,
                            shards=True)
    for stage in ("stage1", "stage2"):
        from_json, root = read_records(paths[f"{stage}_json"])
        from_shards, _ = read_records(paths[f"{stage}_shards"])
        assert sorted(r.id for r in from_json) == sorted(r.id for r in from_shards)
        by_id = {r.id: r for r in from_shards}
        for record in from_json:
            other = by_id[record.id]
            assert other.conversations == record.conversations and (other.image is None) == (record.image is None)
            if record.image is not None:
                shard, offset, size = other.shard
                with open(shard, "rb") as f:
                    f.seek(offset)
                    assert f.read(size) == (root / record.image).read_bytes()

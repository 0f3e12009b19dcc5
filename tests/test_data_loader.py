"""Loader: deterministic order, every sample once per pass across ranks x workers, exact resume, bad data."""
import io
import tarfile
from collections import Counter

import pytest
import torch

from data import synthetic as syn
from data.loader import PretrainLoader, SampleProcessor
from data.shards import DataError, count_samples, expand_shards
from data.transforms import ClipTransform, DinoMultiCrop, EvalTransform


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader_world")
    syn.generate_world(out, samples=96, val_samples=8, shard_size=12, image_size=32, seed=3, workers=2, progress=False)
    return out


def captions(texts):
    return torch.tensor([[len(t) % 50] for t in texts])  # a picklable stand-in for a tokenizer: (N, 1)


def clip_processor():
    return SampleProcessor(clip_transform=ClipTransform(24, (0.5, 1.0)), text_encoder=captions)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def make(world, rank=0, world_size=1, workers=2, batch=4, processor=None, **kw):
    shards = expand_shards(str(world / "train-*.tar"))
    return PretrainLoader(shards, processor or clip_processor(), batch, seed=0, rank=rank, world=world_size,
                          workers=workers, shuffle_buffer=8, **kw)


def test_shapes_and_determinism(world):
    a = take(make(world), 5)
    b = take(make(world), 5)
    assert a[0].images.shape == (4, 3, 24, 24) and a[0].images.dtype == torch.float32
    assert a[0].tokens.shape == (4, 1)
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))  # augmentation too


def test_dino_crops(world):
    proc = SampleProcessor(dino_transform=DinoMultiCrop(32, 16, 2, 3))
    (batch,) = take(make(world, processor=proc, workers=0), 1)
    assert [tuple(c.shape) for c in batch.crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert batch.tokens is None and batch.images is None
    assert all(c.abs().max() < 10 for c in batch.crops)  # normalised values


@pytest.mark.parametrize("workers", [1, 2])
def test_every_sample_once_per_pass_across_ranks(world, workers):
    """2 ranks x `workers` readers: one pass over 96 samples (12 batches of 4 per rank) sees each key once."""
    keys = Counter()
    for rank in range(2):
        for batch in take(make(world, rank, 2, workers=workers), 12):
            keys.update(batch.keys)
    assert len(keys) == 96 and set(keys.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("cut", [1, 4, 5])
def test_resume_continues_the_same_stream(world, workers, cut):
    straight = take(make(world, workers=workers), cut + 6)  # crosses into the second pass
    first = make(world, workers=workers)
    take(first, cut)
    state = first.state_dict()
    resumed = make(world, workers=workers)
    resumed.load_state_dict(state)
    rest = take(resumed, 6)
    assert [b.keys for b in rest] == [b.keys for b in straight[cut:]]
    assert all(torch.equal(x.images, y.images) for x, y in zip(rest, straight[cut:]))


def test_state_mismatch_is_refused(world):
    loader = make(world, workers=2)
    take(loader, 2)
    other = make(world, workers=1)
    with pytest.raises(DataError, match="workers"):
        other.load_state_dict(loader.state_dict())


def test_too_few_shards_and_missing_shards(world, tmp_path):
    with pytest.raises(DataError, match="every reader needs a shard"):
        make(world, rank=0, world_size=4, workers=3)  # 8 shards < 12 readers
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="missing shard"):
        expand_shards(str(world / "train-{000000..000009}.tar"))
    assert count_samples(expand_shards(str(world / "train-*.tar"))) == 96
    # the same shards spelled differently still find sizes.json, and without it the tars count the same
    assert count_samples(expand_shards(str(world) + "//./train-*.tar")) == 96
    copy = tmp_path / "copy"
    copy.mkdir()
    for shard in sorted(world.glob("train-*.tar")):
        (copy / shard.name).write_bytes(shard.read_bytes())
    assert not (copy / "sizes.json").exists() and count_samples(expand_shards(str(copy / "train-*.tar"))) == 96
    with tarfile.open(copy / "train-000000.tar", "a") as tar:  # members of no sample (as webdataset reads them)
        for name in ("README", "._000000000.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    assert count_samples(expand_shards(str(copy / "train-*.tar"))) == 96


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(world, tmp_path, caplog):
    good = {}
    with tarfile.open(world / "train-000000.tar") as tar:
        for m in tar:
            good.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = tar.extractfile(m).read()
    keys = sorted(good)
    members = []
    for i, key in enumerate(keys):
        sample = dict(good[key])
        if i == 1:
            sample["jpg"] = b"not a jpeg at all"  # corrupt image
        if i == 2:
            del sample["txt"]  # incomplete sample
        if i == 3:
            del sample["jpg"]  # no image
        members += [(f"{key}.{ext}", data) for ext, data in sorted(sample.items())]
    _tar(tmp_path / "bad-000000.tar", members)
    truncated = (world / "train-000001.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(truncated[: len(truncated) // 2 + 100])  # cut mid-member
    (tmp_path / "bad-000002.tar").write_bytes(b"")  # empty file
    shards = expand_shards(str(tmp_path / "bad-*.tar"))
    loader = PretrainLoader(shards, clip_processor(), 2, seed=0, workers=0, shuffle_buffer=1)
    seen = [k for b in take(loader, 4) for k in b.keys]  # within the first pass: 9 good + 2 from the truncated shard
    assert keys[0] in seen and set(keys[1:4]).isdisjoint(seen)
    assert loader.skipped["decode_error"] == 1 and loader.skipped["missing_text"] == 1
    assert loader.skipped["missing_image"] == 1 and loader.skipped["unreadable_shard"] >= 2
    assert "skipping bad sample" in caplog.text


def test_shards_without_usable_samples_fail_clearly(tmp_path):
    _tar(tmp_path / "empty-000000.tar", [("a.json", b"{}")])
    loader = PretrainLoader([str(tmp_path / "empty-000000.tar")], clip_processor(), 2, seed=0, workers=0)
    with pytest.raises(DataError, match="gave no usable sample"):
        take(loader, 1)


def test_eval_transform_resizes_and_centre_crops():
    img = torch.arange(3 * 40 * 60, dtype=torch.float32).reshape(3, 40, 60).remainder(256).to(torch.uint8)
    out = EvalTransform(32)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, EvalTransform(32)(img))  # no randomness

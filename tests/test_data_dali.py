"""DALI backend (CPU-only pipelines): shapes, keys, sharding over ranks, exact resume, bad data, the trainer."""
import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from conftest import REPO, tiny_overrides  # noqa: E402
from data import synthetic as syn  # noqa: E402
from data.build import prepare_dali_shards  # noqa: E402
from data.dali.eval import DaliEvalLoader  # noqa: E402
from data.dali.index import ensure_indexes  # noqa: E402
from data.dali.loader import DaliLoader, sample_key  # noqa: E402
from data.dali.pipelines import LUMA, _colour_basis  # noqa: E402
from data.loader import PretrainLoader, SampleProcessor  # noqa: E402
from data.shards import DataError, expand_shards  # noqa: E402
from data.transforms import ClipTransform, DinoMultiCrop, EvalTransform  # noqa: E402
from data.validate import validate_shards, write_outputs  # noqa: E402
from test_train_e2e import losses, pretrain  # noqa: E402

MEAN, STD = np.array(ClipTransform.mean), np.array(ClipTransform.std)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("dali_world")
    syn.generate_world(out, samples=96, val_samples=8, shard_size=12, image_size=32, seed=3, workers=2, progress=False)
    return out


def captions(texts):
    return torch.tensor([[len(t) % 50] for t in texts])  # (N, 1), picklable


def hybrid():
    return SampleProcessor(clip_transform=ClipTransform(24, (0.5, 1.0)), dino_transform=DinoMultiCrop(32, 16, 2, 3),
                           text_encoder=captions)


def dali(world, rank=0, ranks=1, batch=4, processor=None, shards=None, **kw):
    shards = shards or expand_shards(str(world / "train-*.tar"))
    return DaliLoader(shards, ensure_indexes(shards), processor or hybrid(), batch, seed=0, rank=rank, world=ranks,
                      shuffle_buffer=8, **kw)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_shapes_dtypes_ranges(world):
    (batch,) = take(dali(world), 1)
    assert batch.images.shape == (4, 3, 24, 24) and batch.images.dtype == torch.float32
    assert [tuple(c.shape) for c in batch.crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in batch.crops)
    assert batch.tokens.shape == (4, 1) and batch.tokens.dtype == torch.long and batch.attention_mask is None
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD  # normalised [0, 1] pixels, per channel
    x = batch.images.permute(1, 0, 2, 3).reshape(3, -1)
    assert (x.min(1).values >= torch.tensor(lo) - 1e-4).all() and (x.max(1).values <= torch.tensor(hi) + 1e-4).all()
    assert x.std() > 0.1  # real pictures, not a constant
    d_mean, d_std = np.array(DinoMultiCrop.mean), np.array(DinoMultiCrop.std)
    d_lo, d_hi = (0 - d_mean) / d_std, (1 - d_mean) / d_std
    for crop in batch.crops:
        flat = crop.permute(1, 0, 2, 3).reshape(3, -1)
        assert (flat.min(1).values >= torch.tensor(d_lo) - 1e-4).all()
        assert (flat.max(1).values <= torch.tensor(d_hi) + 1e-4).all()
    assert batch.keys[0] == sample_key(f"{world}/train-000000.tar:512:{batch.keys[0]}.jpg")


def test_same_keys_as_the_cpu_path(world):
    shard = [str(world / "train-000003.tar")]
    cpu = PretrainLoader(shard, hybrid(), 4, seed=0, workers=0, shuffle_buffer=8)
    cpu_keys = [k for b in take(cpu, 3) for k in b.keys]  # one pass: 12 samples
    dali_keys = [k for b in take(dali(world, shards=shard), 3) for k in b.keys]
    assert sorted(dali_keys) == sorted(cpu_keys) and len(set(cpu_keys)) == 12


@pytest.mark.parametrize("batch", [4, 6])
def test_every_sample_once_per_epoch_across_two_ranks(world, batch):
    """2 ranks: each epoch (48 samples per rank) covers the 96 samples exactly once; epochs re-partition them."""
    per_rank = [[k for b in take(dali(world, rank, 2, batch=batch), 3 * 48 // batch) for k in b.keys]
                for rank in range(2)]
    epochs = [Counter(per_rank[0][e * 48:(e + 1) * 48] + per_rank[1][e * 48:(e + 1) * 48]) for e in range(3)]
    assert all(len(c) == 96 and set(c.values()) == {1} for c in epochs)
    assert set(per_rank[0][:48]) != set(per_rank[0][48:96])  # shuffle_after_epoch: a new split each epoch


def test_resume_is_exact_and_thread_count_free(world):
    straight = take(dali(world), 30)  # crosses the first epoch (24 batches)
    first = dali(world)
    take(first, 22)
    state = first.state_dict()
    resumed = dali(world, threads=1)
    resumed.load_state_dict(state)
    rest = take(resumed, 8)
    assert [b.keys for b in rest] == [b.keys for b in straight[22:]]
    for x, y in zip(rest, straight[22:]):
        assert torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
        assert all(torch.equal(a, b) for a, b in zip(x.crops, y.crops))
    assert resumed.batches == 30 and resumed.skipped == {}


def test_index_follows_a_shard_replaced_with_the_same_mtime(world, tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes((world / "train-000000.tar").read_bytes())
    (index,) = ensure_indexes([str(shard)])
    assert int(open(index).readline().split()[1]) == 12
    mtime = shard.stat().st_mtime_ns
    fewer = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=fewer, mode="w") as dst:
        for member in list(src)[:3 * 5]:  # 5 samples of jpg/json/txt
            dst.addfile(member, src.extractfile(member))
    shard.write_bytes(fewer.getvalue())
    os.utime(shard, ns=(mtime, mtime))  # e.g. `cp -p` of another file: same mtime, other content
    assert ensure_indexes([str(shard)]) == [index] and int(open(index).readline().split()[1]) == 5


def test_resume_refuses_other_settings_and_backends(world, caplog):
    loader = dali(world)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="world"):
        dali(world, 0, 2).load_state_dict(state)
    other_buffer = DaliLoader(loader.shards, loader.indexes, hybrid(), 4, seed=0, shuffle_buffer=16)
    with pytest.raises(DataError, match="shuffle_buffer=8"):
        other_buffer.load_state_dict(state)
    more_crops = SampleProcessor(clip_transform=ClipTransform(24, (0.5, 1.0)),
                                 dino_transform=DinoMultiCrop(32, 16, 2, 4), text_encoder=captions)
    with pytest.raises(DataError, match="pipeline outputs"):
        dali(world, processor=more_crops).load_state_dict(state)
    with pytest.raises(DataError, match="backend=dali"):
        PretrainLoader(expand_shards(str(world / "train-*.tar")), hybrid(), 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="backend=cpu"):
        loader.load_state_dict({"batches": 2, "positions": {}, "workers": 2, "world": 1, "seed": 0})
    changed = dali(world, shards=expand_shards(str(world / "train-00000[0-5].tar")))
    changed.load_state_dict(state)  # e.g. shards rewritten by data.validate: weights resume, data restarts
    assert changed.restart == 1 and "restarts at an epoch start" in caplog.text
    assert len(take(changed, 1)[0]) == 4


def test_dino_parameter_distributions(world):
    """Grayscale p=0.2 and flips as on the CPU path: count all-grey local crops over 96 x 3 crops."""
    proc = SampleProcessor(dino_transform=DinoMultiCrop(32, 16, 2, 3))
    batches = take(dali(world, batch=8, processor=proc), 12)
    crops = torch.cat([c for b in batches for c in b.crops[2:]])  # (288, 3, 16, 16) locals
    std = torch.tensor(DinoMultiCrop.std).view(1, 3, 1, 1)
    pixels = crops * std + torch.tensor(DinoMultiCrop.mean).view(1, 3, 1, 1)  # back to [0, 1]
    grey = ((pixels - pixels.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1.5 / 255).float().mean()
    assert 0.12 < grey < 0.3, grey


def test_colour_basis_matches_torchvision():
    """Saturation / grayscale are exactly torchvision's blends with the luma grey; contrast pivots on the mean grey."""
    import torchvision.transforms.v2.functional as TF

    p0, p1, p2 = _colour_basis()
    img = torch.rand(3, 8, 8)
    flat = img.reshape(3, -1).double().numpy()
    for s in (0.0, 0.8, 1.2):
        ours = np.clip((p0 + s * p1) @ flat, 0, 1)
        assert np.allclose(ours, TF.adjust_saturation(img, s).reshape(3, -1).numpy(), atol=1e-5)
    assert np.allclose(p0 @ flat, TF.rgb_to_grayscale(img, 3).reshape(3, -1).numpy(), atol=1e-5)
    assert np.allclose(p2 @ np.ones((3, 1)), 0, atol=1e-3)  # hue rotation leaves grey alone
    grey_mean = float(np.array(LUMA) @ flat.mean(1))
    for c in (0.6, 1.4):
        ours = np.clip(c * flat + (1 - c) * grey_mean, 0, 1)
        assert np.allclose(ours, TF.adjust_contrast(img, c).reshape(3, -1).numpy(), atol=1e-5)


def test_eval_pipeline_matches_the_cpu_eval_transform(tmp_path, world):
    from data.convert import convert_imagefolder

    for i, (key, img) in enumerate(_images(world / "train-000000.tar")):
        folder = tmp_path / "tree" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(img)
    convert_imagefolder(str(tmp_path / "tree"), str(tmp_path / "shards"), "val", shard_size=5)
    shards = expand_shards(str(tmp_path / "shards" / "val-*.tar"))
    transform = EvalTransform(24)
    seen = []
    for part in range(2):
        for keys, images, labels in DaliEvalLoader(shards, transform, 4, shard_id=part, num_shards=2):
            assert images.shape[1:] == (3, 24, 24) and labels.dtype == torch.long
            seen += keys
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 12
    reference = {k: v for s in shards for k, v in _images(s, labeled=True)}
    for keys, images, labels in DaliEvalLoader(shards, transform, 5):
        for key, image, label in zip(keys, images, labels):
            pixels, cls = reference[key]
            assert int(label) == cls
            assert (image - transform(pixels)).abs().mean() < 0.03  # bicubic kernels differ slightly


def _images(shard, labeled=False):
    from PIL import Image

    samples = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            samples.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = tar.extractfile(m).read()
    for key, parts in sorted(samples.items()):
        data = parts.get("jpg") or parts.get("png")
        if not labeled:
            yield key, data
            continue
        rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        yield key, (torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), int(parts["cls"]))


# ----------------------------------------------------------------------------- bad data with DALI
def _copy_world(world, dest):
    dest.mkdir()
    for shard in expand_shards(str(world / "train-*.tar")):
        shutil.copy(shard, dest)
    return expand_shards(str(dest / "train-*.tar"))


def _corrupt(shard, member_suffix, payload):
    """Rewrite one member (the 3rd sample's) of a shard in place."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    target = sorted({n.split(".")[0] for n, _ in members})[2]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name == f"{target}.{member_suffix}":
                if payload is None:
                    continue
                data = payload
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_dali_refuses_unvalidated_or_bad_shards(world, tmp_path):
    shards = _copy_world(world, tmp_path / "w")
    pattern = str(tmp_path / "w" / "train-*.tar")
    with pytest.raises(DataError, match=r"needs validated shards .* `python -m data.validate"):
        prepare_dali_shards(shards, ("image", "text"), "require", 1, "", 0, 1, pattern)
    write_outputs(validate_shards(shards, ("image",)), tmp_path / "report.json", None)
    with pytest.raises(DataError, match="validated without checking text"):
        prepare_dali_shards(shards, ("image", "text"), "require", 1, "", 0, 1, pattern)
    assert len(prepare_dali_shards(shards, ("image",), "require", 1, "", 0, 1, pattern)) == len(shards)
    _corrupt(shards[1], "jpg", b"not a jpeg")  # changed after validation
    with pytest.raises(DataError, match="changed since it was validated"):
        prepare_dali_shards(shards, ("image",), "require", 1, "", 0, 1, pattern)
    with pytest.raises(DataError, match=r"found bad data .*decode_error.* --rewrite OUT_DIR"):
        prepare_dali_shards(shards, ("image",), "first_use", 1, "", 0, 1, pattern)  # validates, then refuses
    with pytest.raises(DataError, match=r"cannot skip bad samples .* --rewrite OUT_DIR"):
        prepare_dali_shards(shards, ("image",), "first_use", 1, "", 0, 1, pattern)  # recorded as bad: no re-check


def test_bad_data_behind_a_stale_record_stops_with_a_clear_error(world, tmp_path):
    """If a shard is damaged without its record noticing, DALI stops with a one-line DataError (no hang)."""
    shards = _copy_world(world, tmp_path / "w")
    _corrupt(shards[0], "jpg", b"\xff\xd8 not really a jpeg")
    proc = SampleProcessor(dino_transform=DinoMultiCrop(32, 16, 2, 1))
    with pytest.raises(DataError, match=r"DALI failed while making batch \d+ in .*decoders.image.*data.validate"):
        take(dali(world, batch=12, processor=proc, shards=shards[:1]), 2)
    _corrupt(shards[1], "txt", None)  # a sample without its caption: refused when the pipeline is built
    with pytest.raises(DataError, match="DALI failed"):
        take(dali(world, shards=shards[1:2]), 1)


def test_backend_settings_that_cannot_work_are_refused(world):
    from types import SimpleNamespace

    from data.build import build_train_loader
    from train.config import DataConfig

    shards = expand_shards(str(world / "train-*.tar"))
    for change, message in (({"resampled": True}, "resampled=true is not supported"),
                            ({"dali_decoder": "mixed"}, "decodes on the GPU, and this run has none")):
        cfg = SimpleNamespace(seed=0, data=DataConfig(train=str(world / "train-*.tar"), backend="dali", **change))
        with pytest.raises(DataError, match=message):
            build_train_loader(cfg, shards, hybrid(), 4, 0, 1, "cpu")


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture
def dali_world(tiny_world, tmp_path):
    """A private copy of the tiny world (the DALI runs write validation.json and _dali_index/ beside it)."""
    dest = tmp_path / "world"
    dest.mkdir()
    for path in tiny_world.iterdir():
        if path.is_file():
            shutil.copy(path, dest)
    return dest


@pytest.mark.distributed
def test_trainer_two_ranks_with_dali(dali_world, tmp_path):
    """2 DeepSpeed CPU ranks, hybrid objective (CLIP view + crops + captions), validation on first use."""
    run_dir = tmp_path / "run"
    pretrain("hybrid", tiny_overrides(dali_world, run_dir, "schedule.steps=3", "checkpoint.every=0",
                                      "data.backend=dali", "data.validation=first_use"), ranks=2)
    assert sorted(losses(run_dir)) == [1, 2, 3] and all(np.isfinite(list(losses(run_dir).values())))
    assert (dali_world / "validation.json").is_file() and (dali_world / "_dali_index").is_dir()


@pytest.mark.distributed
def test_trainer_resume_is_exact_and_bad_data_loses_nothing(dali_world, tmp_path):
    """4 steps straight = 2 + resume + 2 (identical losses). Then a shard is damaged: the resume is refused with
    one line, the checkpoint stays, and after `data.validate --rewrite` training goes on from it."""
    common = ["checkpoint.every=2", "data.backend=dali", "data.validation=first_use"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain("clip", tiny_overrides(dali_world, straight, "schedule.steps=4", *common))
    pretrain("clip", tiny_overrides(dali_world, split, "schedule.steps=4", *common, "schedule.stop_after=2"))
    pretrain("clip", tiny_overrides(dali_world, split, "schedule.steps=4", *common, "resume=auto"))
    assert losses(split) == losses(straight) and sorted(losses(split)) == [1, 2, 3, 4]

    _corrupt(str(dali_world / "train-000003.tar"), "jpg", b"not a jpeg any more")
    more = ["schedule.steps=6", "resume=auto", "data.validation=require"]
    out = pretrain("clip", tiny_overrides(dali_world, split, *common, *more), expect_ok=False)
    assert out.returncode == 1 and "changed since it was validated" in out.stderr and "Traceback" not in out.stderr
    assert (split / "checkpoints" / "step_0000004" / "COMPLETE").is_file()
    clean = tmp_path / "clean"
    env = {"PYTHONPATH": str(REPO)}
    rewrite = subprocess.run([sys.executable, "-m", "data.validate", str(dali_world / "train-*.tar"), "--rewrite",
                              str(clean), "--quiet"], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=300)
    assert rewrite.returncode == 0 and "wrote 319 clean samples" in rewrite.stdout, rewrite.stdout + rewrite.stderr
    shutil.copy(dali_world / "tokenizer.model", clean)
    out = pretrain("clip", tiny_overrides(clean, split, *common, *more))
    assert "restarts at an epoch start" in out.stderr
    assert sorted(losses(split)) == [1, 2, 3, 4, 5, 6]

"""Caption tokenizer: training on shard captions, fixed-length encoding invariants, pickling, CLI."""
import pickle
import subprocess
import sys

import pytest
import torch

from data import synthetic as syn
from data.shards import DataError
from data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, CaptionTokenizer, expand_shards,
                            read_captions, train_tokenizer)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    syn.generate_world(out, 200, 20, shard_size=50, image_size=32, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def captions(world_dir) -> list[str]:
    return list(read_captions(expand_shards(str(world_dir / "train-{000000..000003}.tar"))))


@pytest.fixture(scope="module")
def tokenizer(captions, tmp_path_factory) -> CaptionTokenizer:
    model = train_tokenizer(captions, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=300)
    return CaptionTokenizer(model)


def _check_rows(tokens: torch.Tensor, tokenizer: CaptionTokenizer) -> None:
    for row in tokens.tolist():
        assert row[0] == BOS_ID
        end = row.index(EOS_ID)
        assert row.count(EOS_ID) == 1 and row.count(BOS_ID) == 1
        assert PAD_ID not in row[: end + 1] and set(row[end + 1:]) <= {PAD_ID}
        assert all(0 <= i < tokenizer.vocab_size for i in row)


def test_captions_come_from_shards_in_order(world_dir, captions):
    assert len(captions) == 200
    brace = expand_shards(str(world_dir / "train-{000000..000003}.tar"))
    assert expand_shards(str(world_dir / "train-*.tar")) == brace and len(brace) == 4
    _, first_caption, _ = syn.make_sample(0, "train", 0, 32)
    assert captions[0] == first_caption
    with pytest.raises(DataError):
        expand_shards(str(world_dir / "nothing-*.tar"))
    with pytest.raises(DataError):
        expand_shards(str(world_dir / "train-{000000..000009}.tar"))


def test_special_ids_and_vocab(tokenizer):
    special = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)
    assert special == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert 50 < tokenizer.vocab_size <= 300
    assert tokenizer.context_length == 77


def test_encode_shape_padding_and_round_trip(tokenizer, captions):
    tokens = tokenizer.encode(captions[:32])
    assert tokens.shape == (32, 77) and tokens.dtype == torch.long
    _check_rows(tokens, tokenizer)
    assert torch.equal(tokenizer(captions[:32]), tokens)
    for caption, row in zip(captions[:32], tokens):
        assert tokenizer.decode(row) == caption.lower()  # case-folding normalisation
    assert tokenizer.encode(["red star"]).shape == (1, 77)
    assert tokenizer.encode([""])[0, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID]


def test_truncation_keeps_eos_last(tokenizer, captions):
    short = CaptionTokenizer(tokenizer.model_path, context_length=8)
    long_text = " ".join(captions[:10])
    tokens = short.encode([long_text, "a star"])
    assert tokens.shape == (2, 8)
    _check_rows(tokens, short)
    assert tokens[0, -1].item() == EOS_ID and PAD_ID not in tokens[0].tolist()
    assert tokens[0, 1:-1].tolist() == short.processor.encode(long_text)[:6]
    minimal = CaptionTokenizer(tokenizer.model_path, context_length=2)
    assert minimal.encode([long_text]).tolist() == [[BOS_ID, EOS_ID]]
    with pytest.raises(ValueError):
        CaptionTokenizer(tokenizer.model_path, context_length=1)


def test_pickle_round_trip(tokenizer, captions):
    tokenizer.encode(captions[:2])  # processor is loaded
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone._processor is None  # re-created lazily in the worker
    assert torch.equal(clone.encode(captions[:16]), tokenizer.encode(captions[:16]))
    assert (clone.vocab_size, clone.context_length) == (tokenizer.vocab_size, tokenizer.context_length)


def test_training_is_deterministic(captions, tmp_path):
    first = train_tokenizer(captions, str(tmp_path / "a"), vocab_size=300)
    second = train_tokenizer(captions, str(tmp_path / "b"), vocab_size=300)
    assert (tmp_path / "a.vocab").read_text() == (tmp_path / "b.vocab").read_text()
    assert torch.equal(CaptionTokenizer(first).encode(captions), CaptionTokenizer(second).encode(captions))


def test_training_rejects_impossible_input(captions, tmp_path):
    with pytest.raises(ValueError, match="vocab"):
        train_tokenizer(captions, str(tmp_path / "tiny"), vocab_size=10)
    with pytest.raises(ValueError, match="no captions"):
        train_tokenizer(["", "  "], str(tmp_path / "empty"), vocab_size=100)
    model = train_tokenizer(captions[:10], str(tmp_path / "soft"), vocab_size=5000)  # soft limit
    assert CaptionTokenizer(model).vocab_size < 5000


def test_cli_train_and_encode(world_dir, tmp_path, repo_root):
    prefix = tmp_path / "cli" / "spm"
    trained = subprocess.run(
        [sys.executable, "-m", "data.tokenizer", "train", "--shards", str(world_dir / "train-*.tar"),
         "--out", str(prefix), "--vocab-size", "300"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr
    assert prefix.with_suffix(".model").is_file() and prefix.with_suffix(".vocab").is_file()
    encoded = subprocess.run(
        [sys.executable, "-m", "data.tokenizer", "encode", "--model", str(prefix) + ".model", "a red star"],
        cwd=repo_root, capture_output=True, text=True, timeout=120)
    ids = [int(i) for i in encoded.stdout.split()]
    assert encoded.returncode == 0 and ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) > 2
    missing = subprocess.run(
        [sys.executable, "-m", "data.tokenizer", "train", "--shards", str(tmp_path / "none-*.tar"),
         "--out", str(prefix)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1

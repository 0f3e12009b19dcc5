"""SentencePiece caption tokenizer: training on webdataset captions and fixed-length encoding.

Ids are fixed: pad=0, unk=1, bos=2, eos=3. Text is NFKC-normalised and lower-cased
(sentencepiece's `nmt_nfkc_cf` rule), so "Photo" and "photo" share pieces.

    python -m data.tokenizer train --shards 'data_cache/synth/train-*.tar' --out data_cache/synth/spm
    python -m data.tokenizer encode --model data_cache/synth/spm.model "a red star"
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import sentencepiece as spm
import torch

from data.shards import DataError, expand_shards

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NORMALIZATION_RULE = "nmt_nfkc_cf"  # NFKC + case folding


def train_tokenizer(captions: Iterable[str], out_prefix: str, vocab_size: int = 1000,
                    model_type: str = "bpe") -> str:
    """Train a sentencepiece model on `captions`; writes PREFIX.model/.vocab, returns the .model path.

    `vocab_size` is a soft limit: small corpora yield fewer pieces instead of failing.
    Training is single-threaded and unshuffled, so the same captions give the same model.
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
    lines = [c.strip() for c in captions if c and c.strip()]
    if not lines:
        raise ValueError("no captions to train the tokenizer on")
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(out_prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
            normalization_rule_name=NORMALIZATION_RULE, pad_id=PAD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, minloglevel=2)
    except RuntimeError as error:
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}, "
                         f"{len(lines)} captions): {error}") from None
    return f"{out_prefix}.model"


def read_captions(shards: Sequence[str]) -> Iterator[str]:
    """Yield the utf-8 `.txt` captions of webdataset tar shards, in archive order."""
    for shard in shards:
        with tarfile.open(shard, "r") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8")


class CaptionTokenizer:
    """Fixed-length caption encoder: [bos] + pieces + [eos], padded with 0 to `context_length`.

    Picklable: keeps the serialized model bytes and re-creates the processor lazily,
    so it can be shipped to DataLoader workers.
    """

    def __init__(self, model_path: str, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
        self.model_path = str(model_path)
        self.context_length = context_length
        self._model_bytes = Path(model_path).read_bytes()
        self._processor: spm.SentencePieceProcessor | None = None
        processor = self.processor
        self.vocab_size: int = processor.get_piece_size()
        self.pad_id, self.unk_id = processor.pad_id(), processor.unk_id()
        self.bos_id, self.eos_id = processor.bos_id(), processor.eos_id()

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        if self._processor is None:
            self._processor = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        return self._processor

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_processor": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor (N, context_length); over-long captions are cut so eos stays last."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        body = self.context_length - 2
        for row, ids in enumerate(self.processor.encode(list(texts))):
            ids = [self.bos_id, *ids[:body], self.eos_id]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence, ignoring pad/bos/eos."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self.processor.decode([int(i) for i in ids if int(i) not in special])

    def __repr__(self) -> str:
        return (f"CaptionTokenizer({self.model_path!r}, context_length={self.context_length}, "
                f"vocab_size={self.vocab_size})")


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as a single line on stderr (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(f"{self.prog}: error: {message}")


def main(argv: list[str] | None = None) -> None:
    parser = _OneLineParser(prog="python -m data.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece model on shard captions")
    train.add_argument("--shards", required=True, help="brace pattern or glob of webdataset tars")
    train.add_argument("--out", required=True, help="output prefix (writes PREFIX.model, PREFIX.vocab)")
    train.add_argument("--vocab-size", type=int, default=1000)
    train.add_argument("--max-captions", type=int, default=200_000)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    encode = commands.add_parser("encode", help="print the token ids of some text")
    encode.add_argument("--model", required=True)
    encode.add_argument("--context-length", type=int, default=77)
    encode.add_argument("text", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            if args.max_captions < 1:
                raise ValueError(f"--max-captions must be >= 1, got {args.max_captions}")
            captions = list(islice(read_captions(expand_shards(args.shards)), args.max_captions))
            model = train_tokenizer(captions, args.out, args.vocab_size, args.model_type)
            size = CaptionTokenizer(model).vocab_size
            print(f"trained on {len(captions)} captions: {model} ({size} pieces)", file=sys.stderr)
        else:
            tokenizer = CaptionTokenizer(args.model, args.context_length)
            for row in tokenizer.encode(args.text):
                print(" ".join(str(i) for i in row[row != tokenizer.pad_id].tolist()))
    except (ValueError, OSError, DataError) as error:
        raise SystemExit(f"{parser.prog}: error: {error}") from None


if __name__ == "__main__":
    main()

"""Shard lists: brace patterns, globs, sizes, and the deterministic per-rank / per-worker split."""
from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
from pathlib import Path

import braceexpand


class DataError(RuntimeError):
    """A data problem explained in one line (missing shards, too few shards, ...)."""


def expand_shards(pattern: str) -> list[str]:
    """`dir/{000000..000009}.tar`, `dir/*.tar`, or several joined by `::`. Local paths must exist."""
    if not pattern:
        raise DataError("no training shards given: set data.train=PATTERN (brace pattern or glob)")
    urls: list[str] = []
    for part in pattern.split("::"):
        for item in braceexpand.braceexpand(part):
            if "://" in item or item.startswith("pipe:"):
                urls.append(item)  # remote shards (s3://, pipe:...) are opened by webdataset's gopen
            elif any(c in item for c in "*?["):
                urls.extend(sorted(glob.glob(item)))
            else:
                urls.append(item)
    if not urls:
        raise DataError(f"no shards match {pattern!r}")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"missing shard {missing[0]}{more} for data pattern {pattern!r}")
    return urls


def count_samples(shards: list[str]) -> int:
    """Samples in the shards: from sizes.json beside them (img2dataset / our generator), else by reading tar headers."""
    sizes: dict[str, int] = {}  # normalised path -> samples ("./d/x.tar", "d//x.tar" and "d/x.tar" agree)
    for folder in {str(Path(s).parent) for s in shards if "://" not in s}:
        path = Path(folder) / "sizes.json"
        if path.is_file():
            sizes.update({os.path.normpath(Path(folder) / k): int(v) for k, v in json.loads(path.read_text()).items()})
    total = 0
    for shard in shards:
        if "://" not in shard and os.path.normpath(shard) in sizes:
            total += sizes[os.path.normpath(shard)]
        elif "://" in shard or shard.startswith("pipe:"):
            raise DataError(f"cannot count samples of remote shard {shard}: set data.samples_per_epoch")
        else:
            total += _count_tar_samples(shard)
    return total


_MEMBER_KEY = re.compile(r"^((?:.*/|)[^./][^./]*)\.(.+)$")  # key = path up to the basename's first dot


def _count_tar_samples(path: str) -> int:
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                match = _MEMBER_KEY.match(member.name) if member.isreg() else None
                if match:  # webdataset's key; names without an extension or with a leading dot belong to no sample
                    keys.add(match.group(1))
    except tarfile.TarError:
        pass  # a damaged shard counts what could be read; the loader reports the damage
    return len(keys)


def shards_for_pass(shards: list[str], seed: int, pass_index: int, rank: int, world: int, worker: int,
                    workers: int, resampled: bool) -> list[str]:
    """The shards one loader worker reads in one pass.

    Non-resampled: the shard list is shuffled by (seed, pass) and dealt out rank-major, so within a
    pass every shard is read by exactly one (rank, worker). Resampled: each worker draws its share
    with replacement from its own (seed, rank, worker, pass) stream.
    """
    slots = world * workers
    if resampled:
        rng = random.Random(hash_seed(seed, rank, worker, pass_index, 0x5EED))
        return [rng.choice(shards) for _ in range(max(1, len(shards) // slots))]
    order = list(shards)
    random.Random(hash_seed(seed, pass_index, 0xDA7A)).shuffle(order)
    return order[rank::world][worker::workers]


def check_enough_shards(shards: list[str], world: int, workers: int, resampled: bool) -> None:
    slots = world * max(workers, 1)
    if not resampled and len(shards) < slots:
        raise DataError(f"{len(shards)} shards for {world} ranks x {max(workers, 1)} loader workers = {slots} readers: "
                        f"every reader needs a shard. Use more (smaller) shards, fewer data.workers, or data.resampled=true")


def hash_seed(*parts: int) -> int:
    """A stable 64-bit seed from integers (Python's hash() is salted per process for str; ints are not, but be explicit)."""
    h = 0xCBF29CE484222325
    for p in parts:
        for byte in int(p).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h

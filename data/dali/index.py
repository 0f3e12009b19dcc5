"""DALI index files of webdataset shards (`fn.readers.webdataset(index_paths=...)`).

Made with `wds2idx.IndexCreator` (shipped with DALI) once per shard and reused: the index of
`DIR/name.tar` is `DIR/_dali_index/name.idx`, or `INDEX_DIR/<folder hash>/name.idx` with
`data.dali_index_dir`. An index is current when the stamp beside it (`name.idx.stamp`: the shard's size
and mtime when it was indexed) matches the shard, so a shard rewritten or replaced in place, even by a
copy that keeps the old mtime, gets a new index. Without index files DALI scans every tar at start-up.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from data.shards import DataError

INDEX_FOLDER = "_dali_index"


def index_path(shard: str, index_dir: str = "") -> Path:
    path = Path(shard).resolve()
    if not index_dir:
        return path.parent / INDEX_FOLDER / (path.stem + ".idx")
    folder_hash = hashlib.sha1(str(path.parent).encode()).hexdigest()[:12]
    return Path(index_dir).expanduser() / folder_hash / (path.stem + ".idx")


def _stamp(shard: str) -> str:
    st = Path(shard).stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def index_is_current(shard: str, index: Path) -> bool:
    try:
        return index.is_file() and Path(f"{index}.stamp").read_text() == _stamp(shard)
    except OSError:
        return False


def index_samples(index: Path) -> int:
    """The sample count in an index file's header (`v1.2 N`)."""
    with open(index) as f:
        return int(f.readline().split()[1])


def write_index(shard: str, index: Path) -> Path:
    """(Re)write the index of one shard atomically, then its stamp (the shard's size and mtime)."""
    try:
        from wds2idx import IndexCreator  # ships with nvidia-dali
    except ImportError:
        raise DataError("wds2idx (shipped with NVIDIA DALI) is not importable: reinstall nvidia-dali") from None
    stamp = _stamp(shard)  # before indexing: a shard replaced meanwhile then fails the check next time
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
        with IndexCreator(shard, str(tmp), verbose=False) as creator:
            creator.create_index()
    except PermissionError as e:
        raise DataError(f"cannot write the DALI index {index} ({e.strerror}): set data.dali_index_dir to a "
                        f"writable folder") from None
    except ValueError as e:  # "Webdataset Tar File empty"
        raise DataError(f"cannot index shard {shard}: {e}; check it with `python -m data.validate`") from None
    os.replace(tmp, index)
    stamp_tmp = index.with_name(f".{index.name}.stamp.{os.getpid()}.tmp")
    stamp_tmp.write_text(stamp)
    os.replace(stamp_tmp, f"{index}.stamp")  # last: an index without its stamp is rewritten next time
    return index


def ensure_indexes(shards: list[str], index_dir: str = "") -> list[str]:
    """The index file of every shard, writing the missing or outdated ones. Run it on one rank."""
    out = []
    for shard in shards:
        if "://" in shard or shard.startswith("pipe:"):
            raise DataError(f"data.backend=dali reads local shard files only, got {shard}: copy or mount the "
                            f"shards locally, or use data.backend=cpu")
        index = index_path(shard, index_dir)
        if not index_is_current(shard, index):
            write_index(shard, index)
        out.append(str(index))
    return out

"""Folders that appear complete or not at all: an export or a converted model is written into a temp folder
beside its destination and renamed into place, so a reader (the eval watcher, a second rank, a user) never sees a
half-written one and an interrupted write leaves the previous version intact.

    with atomic_folder("runs/x/export/step_0000100") as tmp:
        model.save_pretrained(tmp)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder (hidden: `.NAME.tmp-*`); when the block ends without an error it replaces
    `out_dir` (an existing one is moved aside first: a non-empty folder cannot be replaced in one rename)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared folder from other users
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

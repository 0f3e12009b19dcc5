"""Make `python launch/x.py` import the repo's packages: the repo root goes first on sys.path.

Python puts launch/ itself first; without this, `launch/eval.py` would shadow the `eval` package even when
the root is already on sys.path (PYTHONPATH, editable installs).
"""
import argparse
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
while ROOT in sys.path:
    sys.path.remove(ROOT)
sys.path.insert(0, ROOT)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`prog: error: ...`, exit 1) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(f"{self.prog}: error: {message}")

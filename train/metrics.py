"""Rank-0 logging: metrics.jsonl (every logged step), a progress bar, and wandb (online/offline/disabled)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


def wandb_mode(setting: str) -> str:
    """`auto`: WANDB_MODE if set, else online with an API key and offline without one."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int, enabled: bool, config_dict: dict):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar: Optional[tqdm] = None
        self.wandb = None
        if not enabled:
            return
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run in a reused folder
        elif start_step > 0:
            self._truncate_after(start_step)  # steps logged after the checkpoint we resume from are redone
        self.file = self.path.open("a")
        if cfg.logging.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=cfg.run.name or run_dir.name, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        mode = wandb_mode(cfg.logging.wandb)
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")  # keep the console to the progress bar; WANDB_SILENT=false to see wandb
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name or run_dir.name,
                                    dir=str(run_dir), config=config_dict, mode=mode, resume="allow",
                                    id=_wandb_id(run_dir))

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.1f}", refresh=False)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same wandb run."""
    id_file = run_dir / ".wandb_id"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()

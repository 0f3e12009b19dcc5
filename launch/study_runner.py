"""Run a study plan: each stage a subprocess with its own log; finished stages skipped, interrupted ones resumed.

State lives beside the work: OUT/<stage>/stage.json records status (running | done | failed | interrupted),
the command's fingerprint, seconds and the log path. A rerun skips a stage whose record is `done` with the same
command, reruns one whose command changed (from scratch: its folder is cleared), and reruns anything else; the
training stages pass `resume=auto`, so they continue from their newest complete checkpoint. A failed stage blocks
only the stages that need its output; the rest go on.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from study_plan import ROOT, TRAINING_KINDS, Stage, fingerprint

CHECKPOINT_MARKER = "COMPLETE"  # train/checkpoint.py MARKER: a checkpoint folder that resume=auto accepts
TOTAL_STEPS = re.compile(r", (\d+) steps \(")


def fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def read_record(stage: Stage, out: Path) -> dict:
    path = stage.folder(out) / "stage.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_record(stage: Stage, out: Path, record: dict) -> None:
    folder = stage.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "stage.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / "stage.json")  # atomic: a kill leaves the old record or the new one


def training_progress(stage: Stage, out: Path, log: Path) -> Optional[tuple[int, int]]:
    """(step done, total steps) of a running training stage, from its metrics.jsonl and its log's start line."""
    if stage.kind not in TRAINING_KINDS:
        return None
    try:
        match = TOTAL_STEPS.findall(log.read_text(errors="replace"))
        lines = (stage.folder(out) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    if not match:
        return None
    step = 0
    for line in reversed(lines):
        try:
            step = int(json.loads(line)["step"])
            break
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
    return step, int(match[-1])


class Interrupted(Exception):
    pass


class StudyRunner:
    def __init__(self, stages: list[Stage], out: Path, log: Callable[[str], None] = print, poll_s: float = 30.0,
                 env: Optional[dict] = None):
        self.stages, self.out, self.log, self.poll_s = stages, out, log, poll_s
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.status: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self.spent = self.estimated = 0.0  # of stages run in this invocation: the ETA's calibration
        self.child: Optional[subprocess.Popen] = None

    # ------------------------------------------------------------------ ETA
    def _scale(self) -> float:
        return min(4.0, max(0.25, self.spent / self.estimated)) if self.estimated > 0 else 1.0

    def _remaining_after(self, index: int) -> float:
        return sum(s.estimate_s for s in self.stages[index + 1:]
                   if self.status.get(s.name) not in ("done", "skipped")) * self._scale()

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, str]:
        total = len(self.stages)
        self.log(f"[study] {total} stages, estimated {fmt_s(self._remaining_after(-1))} in all; out {self.out}")
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            for index, stage in enumerate(self.stages):
                self._run_one(index, stage, total)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.status

    def _on_signal(self, signum, frame) -> None:
        raise Interrupted(signal.Signals(signum).name)

    def _run_one(self, index: int, stage: Stage, total: int) -> None:
        tag = f"[{index + 1}/{total}] {stage.name}"
        blocked = [d for d in stage.deps if self.status.get(d) not in ("done", "skipped")]
        if blocked:
            self.status[stage.name] = "blocked"
            self.records[stage.name] = {"status": "blocked", "blocked_by": blocked}
            self.log(f"{tag}: blocked by {', '.join(blocked)} (not run)")
            return
        try:
            argv = stage.command(self.out)
        except (FileNotFoundError, OSError) as e:
            self._finish(stage, tag, {"status": "failed", "error": str(e), "seconds": 0.0})
            return
        fp = fingerprint(argv, self.out)
        record = read_record(stage, self.out)
        rebuilt = [d for d in stage.deps if self.status.get(d) == "done"]  # inputs made again in this invocation
        if record.get("status") == "done" and record.get("fingerprint") == fp and not rebuilt:
            self.status[stage.name] = "skipped"
            self.records[stage.name] = record
            self.log(f"{tag}: done earlier in {fmt_s(record.get('seconds', 0))} (skipped)")
            return
        folder = stage.folder(self.out)
        if record and folder.exists() and (record.get("fingerprint") != fp or
                                           (rebuilt and record.get("status") == "done")):
            why = ("its command changed since it ran" if record.get("fingerprint") != fp
                   else f"its input {', '.join(rebuilt)} was made again")
            self.log(f"{tag}: {why}: starting it over")
            shutil.rmtree(folder)
        elif record.get("status") in ("running", "interrupted", "failed") and stage.kind in TRAINING_KINDS:
            ckpts = sorted(p for p in (folder / "checkpoints").glob("step_*") if (p / CHECKPOINT_MARKER).is_file())
            self.log(f"{tag}: was {record['status']}: continuing from "
                     + (ckpts[-1].name if ckpts else "the start (no complete checkpoint yet)"))
        log_path = self.out / "logs" / f"{stage.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        base = {"name": stage.name, "kind": stage.kind, "variant": stage.variant, "seed": stage.seed,
                "fingerprint": fp, "command": argv, "log": str(log_path)}
        write_record(stage, self.out, {**base, "status": "running", "started": time.time()})
        self.log(f"{tag}: started, estimated {fmt_s(stage.estimate_s * self._scale())}; overall ETA "
                 f"{fmt_s(stage.estimate_s * self._scale() + self._remaining_after(index))}; log {log_path}")
        start = time.time()
        try:
            returncode = self._execute(argv, log_path, stage, tag, index, start)
        except Interrupted as e:
            self._stop_child()
            write_record(stage, self.out, {**base, "status": "interrupted", "seconds": time.time() - start,
                                           "signal": str(e)})
            self.log(f"{tag}: interrupted ({e}); rerun the same command to continue")
            raise
        seconds = time.time() - start
        self.spent += seconds
        self.estimated += stage.estimate_s
        if returncode == 0:
            self._finish(stage, tag, {**base, "status": "done", "seconds": seconds, "finished": time.time()})
        else:
            self._finish(stage, tag, {**base, "status": "failed", "seconds": seconds, "returncode": returncode,
                                      "error": _last_line(log_path)})

    def _finish(self, stage: Stage, tag: str, record: dict) -> None:
        if stage.folder(self.out).exists() or record["status"] == "done":
            write_record(stage, self.out, record)
        self.status[stage.name] = record["status"]
        self.records[stage.name] = record
        if record["status"] == "done":
            self.log(f"{tag}: done in {fmt_s(record['seconds'])}")
        else:
            where = f"; log {record['log']}" if record.get("log") else ""
            code = f" (exit {record['returncode']})" if "returncode" in record else ""
            self.log(f"{tag}: FAILED{code}: {record.get('error', '')}{where}")

    def _execute(self, argv: list[str], log_path: Path, stage: Stage, tag: str, index: int, start: float) -> int:
        with log_path.open("a") as log_file:
            log_file.write(f"\n$ {' '.join(argv)}\n")
            log_file.flush()
            self.child = subprocess.Popen(argv, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=self.env)
            try:
                while True:
                    try:
                        return self.child.wait(timeout=self.poll_s)
                    except subprocess.TimeoutExpired:
                        self.log(self._progress_line(stage, tag, index, start, log_path))
            finally:
                if self.child.poll() is None:
                    self._stop_child()
                self.child = None

    def _progress_line(self, stage: Stage, tag: str, index: int, start: float, log_path: Path) -> str:
        elapsed = time.time() - start
        progress = training_progress(stage, self.out, log_path)
        if progress and progress[0] > 0:
            step, steps = progress
            left = elapsed / step * (steps - step)  # includes start-up in the rate: errs long
            what = f"step {step}/{steps} ({100 * step / steps:.0f}%), stage ETA {fmt_s(left)}"
        else:
            expected = stage.estimate_s * self._scale()
            left = max(0.0, expected - elapsed)
            what = f"running, estimated {fmt_s(left)} left" if left > 0 else f"running past its estimate ({fmt_s(expected)})"
        return f"{tag}: {what}, {fmt_s(elapsed)} elapsed; overall ETA {fmt_s(left + self._remaining_after(index))}"

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _last_line(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def print_summary(runner: StudyRunner, out: Path, log: Callable[[str], None] = print) -> None:
    width = max(len(s.name) for s in runner.stages)
    log(f"\n{'stage':<{width}}  status     time     log")
    for stage in runner.stages:
        rec = runner.records.get(stage.name, {})
        status = runner.status.get(stage.name, "not run")
        log(f"{stage.name:<{width}}  {status:<9}  {fmt_s(rec.get('seconds', 0)):>7}  {rec.get('log', '')}")
    sys.stdout.flush()

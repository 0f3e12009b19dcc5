"""Evaluate every new complete export of a run folder, once, beside (or after) the training.

    Watcher(run_dir, tasks="linear_probe,knn", data="data_cache/synthetic").run(once=True)
    handle = start_watcher(run_dir, tasks, data)   # the trainer (rank 0), eval.watch=true
    handle.finish()                                # end of training: evaluate what is left, then exit

- An export counts when `export/step_NNNNNNN/` (exact name: the trainer's temp folders `.step_*.tmp-*` never
  match) holds a clipdino `config.json` and a `model.safetensors` whose size matches its own header, so a
  folder still being copied is skipped and picked up on a later poll.
- A VLM run (`kind="vlm"`: the run config sets `model.llm`) exports Hugging Face LLaVA folders (`config.json`
  with `model_type: llava`, complete safetensors, tokenizer and processor configs); each is scored on VMCBench
  (`launch/eval_vmcbench.py`, arguments from the run's `eval` section: `vlm_eval_args`) instead of the encoder
  tasks. Everything else (ledger, retries, stop signals, reports) is the same.
- Each export is evaluated in its own process (`launch/eval.py`), so a crash, an OOM or a hang (with
  `eval_timeout`) of one evaluation costs that export only; the watcher records it and goes on.
- `RUN_DIR/evals.jsonl` is the ledger: one row per evaluated export (ok or failed), appended after the
  evaluation ends; exports with a row are never evaluated again, across watcher restarts (`retry_failed`
  re-runs failed ones). A lock file keeps two watchers off the same run.
- After each evaluation `RUN_DIR/evals.md` (a table of every summary metric by step) and `RUN_DIR/evals.png`
  (metric against step) are regenerated; per-export outputs live in `RUN_DIR/evals/step_NNNNNNN/`.
Ending: with `stop_file`, the watcher evaluates what is left and exits once that file exists (the trainer's
`finish()` creates it); with `follow_pid`, once that process is gone (a crashed trainer); SIGTERM / SIGINT:
exit after the current evaluation. (A file, not a signal: a signal sent while the watcher is still starting
would kill it before its handler exists.)
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
EXPORT_NAME = re.compile(r"^step_(\d{7,})$")
LEDGER, REPORT, PLOT, LOCK, STOP = "evals.jsonl", "evals.md", "evals.png", ".evals.lock", ".evals.stop"
EXPORT_FORMAT = "clipdino-export"  # models.export.FORMAT, not imported: the long-lived watcher stays free of torch
ENCODER, VLM = "encoder", "vlm"  # what a run exports: clipdino encoders (eval.py tasks) or HF LLaVA (VMCBench)
VLM_EVAL_DEFAULTS = {"split": "dev", "limit": None, "max_new_tokens": 16, "batch_size": 8}  # the run's eval.*


class WatcherBusy(RuntimeError):
    pass


def safetensors_complete(path: Path) -> bool:
    """Header readable and the file exactly as long as the header says (a partial copy is shorter)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return size == 8 + n + max(ends, default=0)


def export_complete(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("format") == EXPORT_FORMAT and safetensors_complete(folder / "model.safetensors")


def llava_export_complete(folder: Path) -> bool:
    """A Hugging Face LLaVA folder with all its weights (one file or every shard of the index) and processor."""
    try:
        config = json.loads((folder / "config.json").read_text())
        index = folder / "model.safetensors.index.json"
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    has_processor = (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()
    return (config.get("model_type") == "llava" and has_processor and (folder / "tokenizer_config.json").is_file()
            and all(safetensors_complete(folder / name) for name in shards))


def complete_exports(run_dir: Path, skip: frozenset[str] | set[str] = frozenset(), kind: str = ENCODER
                     ) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete exports, by step; names in `skip` are not even checked."""
    folder = run_dir / "export"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.name not in skip and (m := EXPORT_NAME.match(p.name)) and p.is_dir()]
    complete = llava_export_complete if kind == VLM else export_complete
    return sorted((step, p) for step, p in found if complete(p))


def vlm_eval_args(eval_section: dict[str, Any]) -> list[str]:
    """launch/eval_vmcbench.py arguments from a VLM run's `eval` section (split, limit, max_new_tokens, batch_size)."""
    values = {**VLM_EVAL_DEFAULTS, **{k: eval_section[k] for k in VLM_EVAL_DEFAULTS if eval_section.get(k) is not None}}
    args = ["--split", str(values["split"]), "--max-new-tokens", str(values["max_new_tokens"]),
            "--batch-size", str(values["batch_size"])]
    return args + (["--limit", str(values["limit"])] if values["limit"] is not None else [])


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    """The ledger's rows; a torn last line (killed mid-write) is skipped, so that export is evaluated again."""
    from train.plots import read_jsonl

    path = run_dir / LEDGER
    return read_jsonl(path) if path.is_file() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_evaluations(run_dir: str | os.PathLike, exports: Sequence[str]) -> None:
    """Move the ledger rows of these export names to evals_abandoned.jsonl (a rolled-back run re-exports them)."""
    path = Path(run_dir) / LEDGER
    if not path.is_file() or not exports:
        return
    rows = read_ledger(Path(run_dir))
    keep = [r for r in rows if r.get("export") not in set(exports)]
    gone = [r for r in rows if r.get("export") in set(exports)]
    if gone:
        with open(Path(run_dir) / "evals_abandoned.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in gone)
        tmp = path.with_name(f".{LEDGER}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)


class Watcher:
    def __init__(self, run_dir: str | os.PathLike, tasks: str, data: str, interval: float = 30.0,
                 eval_args: Sequence[str] = (), eval_timeout: Optional[float] = None, retry_failed: bool = False,
                 log: Callable[[str], None] = lambda m: print(m, flush=True), kind: str = ENCODER):
        if kind not in (ENCODER, VLM):
            raise ValueError(f"unknown export kind {kind!r} ({ENCODER} | {VLM})")
        # absolute paths: the evaluations must find them whatever the working directory
        self.run_dir, self.tasks, self.kind = Path(run_dir).resolve(), tasks, kind
        self.data = str(Path(data).resolve()) if data else data
        self.interval, self.eval_args, self.eval_timeout = interval, list(eval_args), eval_timeout
        self.retry_failed, self.log = retry_failed, log
        self.attempted: set[str] = set()  # exports evaluated by this watcher: a retried failure is retried once
        self.signals = 0  # stop signals received: 1 = after this evaluation, 2 = now

    @property
    def stopping(self) -> bool:
        return self.signals > 0

    # ------------------------------------------------------------------ one export
    def pending(self) -> list[tuple[int, Path]]:
        done = {r["export"] for r in read_ledger(self.run_dir)
                if r.get("status") == "ok" or not self.retry_failed} | self.attempted
        return complete_exports(self.run_dir, skip=done, kind=self.kind)  # evaluated exports never change

    def evaluate(self, step: int, export: Path) -> Optional[dict[str, Any]]:
        """The ledger row of one evaluation; None when the watcher was stopping and the evaluation was killed."""
        out = self.run_dir / "evals" / export.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").unlink(missing_ok=True)  # a stale file from an interrupted attempt must not count
        if self.kind == VLM:
            cmd = [sys.executable, str(REPO / "launch" / "eval_vmcbench.py"), "--model", str(export), "--data",
                   self.data, "--out", str(out), "--no-progress", *self.eval_args]
        else:
            cmd = [sys.executable, str(REPO / "launch" / "eval.py"), "--checkpoint", str(export), "--data", self.data,
                   "--out", str(out), "--tasks", self.tasks, "--no-cache", "--no-progress", *self.eval_args]
        self.log(f"[watch] evaluating {export} -> {out}")
        start = time.perf_counter()
        row: dict[str, Any] = {"step": step, "export": export.name, "out": str(out.relative_to(self.run_dir))}
        with open(out / "eval.log", "w") as log_file:
            # its own session: a first Ctrl-C / SIGTERM stops the watcher after this evaluation; a second one
            # ends the evaluation too (no row: it is redone next time)
            child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            rc = self._wait(child, start)
        if (rc is not None and rc < 0 and self.stopping) or self.signals >= 2:  # ended while stopping: redo it later
            return None
        row["time_s"] = round(time.perf_counter() - start, 2)
        results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
        if results is not None:
            row["summary"] = results.get("summary", {})
            row["failed_tasks"] = results.get("failed", [])
        if rc == 0 and results is not None:
            row["status"] = "ok"
        else:
            row["status"] = "failed"
            row["error"] = (f"timed out after {self.eval_timeout} s" if rc is None else
                            _last_error_line(out / "eval.log") or f"exit code {rc}")
        row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return row

    def _wait(self, child: subprocess.Popen, start: float) -> Optional[int]:
        """The evaluation's exit code; None after --eval-timeout. Ends it on a second stop signal or a timeout."""
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            timed_out = self.eval_timeout is not None and time.perf_counter() - start > self.eval_timeout
            if self.signals >= 2 or timed_out:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                return None if timed_out else child.returncode

    def record(self, row: dict[str, Any]) -> None:
        path = self.run_dir / LEDGER
        torn = False
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as f:  # the last byte only: the ledger grows with every export
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(row) + "\n")  # after a torn last line: a line of its own
            f.flush()
            os.fsync(f.fileno())
        try:
            self.regenerate()
        except Exception as e:  # a report that cannot be drawn must not stop the evaluations
            self.log(f"[watch] could not regenerate {REPORT} / {PLOT}: {type(e).__name__}: {e}")

    def regenerate(self) -> None:
        from eval.plots import metrics_vs_step

        rows = sorted(read_ledger(self.run_dir), key=lambda r: r.get("step", 0))
        (self.run_dir / REPORT).write_text(render_ledger(rows, self.run_dir.name))
        ok = [r for r in rows if r.get("summary")]
        if ok:
            metrics_vs_step(ok, self.run_dir / PLOT, f"evaluations of {self.run_dir.name}")

    # ------------------------------------------------------------------ loops
    def run_once(self) -> int:
        """Evaluate every pending export; returns how many were evaluated."""
        count = 0
        for step, export in self.pending():
            if self.stopping:
                break
            self.attempted.add(export.name)
            try:
                row = self.evaluate(step, export)
            except Exception as e:  # the watcher's own trouble (disk full, ...) costs this export only
                row = {"step": step, "export": export.name, "status": "failed",
                       "error": f"watcher: {type(e).__name__}: {e}"}
            if row is None:
                self.log(f"[watch] step {step}: interrupted, left for the next watcher")
                break
            self.record(row)
            self.log(f"[watch] step {step}: {row['status']}" + (f" ({row['error']})" if "error" in row else ""))
            count += 1
        return count

    def _on_signal(self, *_: Any) -> None:
        self.signals += 1
        if self.signals == 1:
            self.log("[watch] stopping after the current evaluation (signal again to end it now)")

    def run(self, once: bool = False, follow_pid: Optional[int] = None,
            stop_file: Optional[str | os.PathLike] = None) -> int:
        def over() -> bool:
            return ((stop_file is not None and Path(stop_file).exists())
                    or (follow_pid is not None and not _pid_alive(follow_pid)))

        with _lock(self.run_dir):
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            total = 0
            while not self.stopping:
                ending = once or over()  # decided before the scan: an export written just before the end counts
                total += self.run_once()
                if ending:
                    break
                deadline = time.monotonic() + self.interval
                while time.monotonic() < deadline and not (self.stopping or over()):
                    time.sleep(min(0.5, self.interval))
            return total


class _lock:
    """An exclusive, non-blocking flock on RUN_DIR/.evals.lock for the watcher's lifetime."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK

    def __enter__(self) -> "_lock":
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise WatcherBusy(f"another watcher (pid {holder}) is evaluating {self.path.parent}") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _last_error_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or [""])[-1][:300]


def render_ledger(rows: list[dict[str, Any]], title: str) -> str:
    """evals.md: every summary metric by step; failures listed with their error."""
    metrics = sorted({k for r in rows for k in (r.get("summary") or {})})
    lines = [f"# Evaluations: {title}", "", f"{len(rows)} export(s) evaluated; figures: [{PLOT}]({PLOT}); per-export "
             "details in `evals/step_NNNNNNN/results.md`.", ""]
    if metrics:
        lines += ["| step | status | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
        for r in rows:
            s = r.get("summary") or {}
            cells = [f"{s[m]:.4g}" if isinstance(s.get(m), (int, float)) else "—" for m in metrics]
            lines.append(f"| {r.get('step')} | {r.get('status')} | " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r for r in rows if r.get("status") != "ok" or r.get("failed_tasks")]
    if failed:
        lines += ["## Failures", ""]
        lines += [f"- step {r.get('step')}: {r.get('error') or 'task(s) failed: ' + ', '.join(r['failed_tasks'])} "
                  f"(log: `{r.get('out')}/eval.log`)" for r in failed]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- trainer side
class WatcherProcess:
    """A watcher started as a separate process by the trainer."""

    def __init__(self, proc: subprocess.Popen, stop_file: Path):
        self.proc, self.stop_file = proc, stop_file

    def finish(self) -> None:
        """Training is over: the watcher evaluates the remaining exports, then exits (it is not waited for)."""
        self.stop_file.touch()
        self.proc.poll()  # reaps it if it has already exited


def start_watcher(run_dir: str | os.PathLike, tasks: str, data: str = "", extra: Sequence[str] = (),
                  log: Callable[[str], None] = print) -> WatcherProcess:
    """Start launch/watch_evals.py on `run_dir` in its own session, following this process."""
    run_dir = Path(run_dir).resolve()  # the watcher resolves paths against this process's working directory
    run_dir.mkdir(parents=True, exist_ok=True)
    stop_file = run_dir / STOP
    stop_file.unlink(missing_ok=True)  # from an earlier invocation of this run (resume)
    cmd = [sys.executable, str(REPO / "launch" / "watch_evals.py"), str(run_dir), "--tasks", tasks,
           "--follow-pid", str(os.getpid()), "--stop-file", str(stop_file), "--interval", "10"]
    cmd += ["--data", str(Path(data).resolve())] if data else []
    if extra:
        cmd += ["--", *extra]
    log_path = run_dir / "evals.log"
    with open(log_path, "a") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    log(f"[clipdino] eval watcher started (pid {proc.pid}): results in {run_dir / REPORT}, log {log_path}")
    return WatcherProcess(proc, stop_file)


def default_eval_data(run_dir: Path, eval_data: str = "", train_pattern: str = "") -> str:
    """eval.data, else the synthetic world beside data.train (the run's config values)."""
    if eval_data:
        return eval_data
    folder = Path(train_pattern).parent if train_pattern else None
    if folder is not None and (folder / "world.json").is_file():
        return str(folder)
    raise ValueError(f"no evaluation data for {run_dir}: set eval.data (a synthetic world or labeled shards folder)"
                     f" or pass --data; data.train={train_pattern!r} is not a synthetic world")


def watch_from_config(cfg: Any, run_dir: str | os.PathLike, log: Callable[[str], None] = print, start: bool = True
                      ) -> Optional[WatcherProcess]:
    """The trainer's `eval.watch=true` hook: check eval.tasks / eval.data (raises ValueError, on every rank, so
    no rank is left waiting), and with `start` (rank 0) start a watcher for this run. A VLM run (`model.llm`
    set) is scored on VMCBench: eval.data is the dataset; the watcher reads split / limit / ... from config.yaml."""
    vlm = bool(getattr(cfg.model, "llm", None))
    if vlm:
        data = cfg.eval.data
        if not data or not Path(data).exists():
            raise ValueError(f"eval.data={data!r}: a VLM run is evaluated on VMCBench; set eval.data to its folder")
    else:
        from eval.tasks import parse_tasks

        parse_tasks(cfg.eval.tasks)
        data = default_eval_data(Path(run_dir), cfg.eval.data, cfg.data.train)
        if not Path(data).is_dir():
            raise ValueError(f"eval.data={data!r} is not a folder")
    if not start:
        return None
    import torch

    extra = [] if torch.cuda.is_available() else ["--threads", "1"] + ([] if vlm else ["--workers", "1"])
    return start_watcher(run_dir, "vmcbench" if vlm else cfg.eval.tasks, data, extra, log)

"""launch/bench.py all: the table from saved reports, and real tiny runs where one part fails and one times out."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO / "launch") not in sys.path:
    sys.path.append(str(REPO / "launch"))  # after the repo root: launch/eval.py must not shadow the eval package

import bench_all  # noqa: E402
import bench_all_table  # noqa: E402


def run_all(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "launch/bench.py", "all", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """part name -> its cells, from the one table of bench_all.md."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| part | what is measured | configuration | our figure | reference figure | ratio |")
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]
    assert all(len(row) == len(bench_all_table.COLUMNS) for row in rows)
    return {row[0]: row for row in rows}


def saved(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def test_rows_from_saved_reports() -> None:
    """Every subcommand's saved JSON gives its figures, the reference's and the ratio, unchanged."""
    parts = {"train_clip": ("train", {"main": saved("train_cpu_vitb16_clip_vs_open_clip.json")}),
             "train_dino": ("train", {"main": saved("train_cpu_vitb16_dino.json")}),
             "data_pil": ("data", {"main": saved("data_cpu_dino_t1.json")}),
             "data_dali": ("data", {"main": saved("data_dali_dino_t1.json")}),
             "loss_clip": ("loss", {"ours": saved("loss_clip_triton_fp32_cpu.json"),
                                    "reference": saved("loss_clip_torch_fp32_cpu.json")}),
             "eval": ("eval", {"main": saved("eval_cpu.json")}),
             "vlm": ("vlm", {"main": saved("bench_vlm_cpu_tiny.json")})}
    records = [{"name": n, "group": g, "options": "", "status": "ok", "error": None, "seconds": 9.0, "reports": r}
               for n, (g, r) in parts.items()]
    rows = {r["name"]: bench_all_table.table_row(r, {n: r for n, (_, r) in parts.items()}) for r in records}
    assert all(r["status"] == "ok" for r in records)
    num = bench_all_table.num
    train = parts["train_clip"][1]["main"]
    clip = rows["train_clip"]
    assert clip["our figure"].startswith(f"{num(train['samples_per_s'])} samples/s (MFU {100 * train['mfu']:.1f}%")
    assert clip["reference figure"].startswith(f"open_clip {num(train['ref_samples_per_s'])} samples/s")
    assert clip["ratio"] == f"{train['ratio']:.2f}x"
    assert rows["train_dino"]["reference figure"] == "-" and "no self-distillation" in rows["train_dino"]["notes"]
    pil, dali = parts["data_pil"][1]["main"]["images_per_s"], parts["data_dali"][1]["main"]["images_per_s"]
    assert rows["data_pil"]["our figure"].startswith(f"{num(pil)} images/s") and rows["data_pil"]["ratio"] == "-"
    assert rows["data_dali"]["ratio"] == f"{dali / pil:.2f}x"
    assert f"{num(pil)} images/s" in rows["data_dali"]["reference figure"]
    ours, ref = (parts["loss_clip"][1][role]["results"] for role in ("ours", "reference"))
    measured = [{x["batch"] for x in side if "peak_alloc_bytes" in x} for side in (ours, ref)]
    batch = max(measured[0] & measured[1])
    a, b = (next(x for x in side if x["batch"] == batch) for side in (ours, ref))
    loss = rows["loss_clip"]  # the largest batch both reports measured; interpreter: no time ratio
    assert f"batch {batch}," in loss["configuration"] and bench_all_table.mem(a["peak_alloc_bytes"]) in loss["our figure"]
    assert bench_all_table.mem(b["peak_alloc_bytes"]) in loss["reference figure"]
    assert loss["ratio"] == f"memory {a['peak_alloc_bytes'] / b['peak_alloc_bytes']:.2f}x"
    tiny = parts["eval"][1]["main"]["models"]["tiny"]
    assert f"tiny: forward {num(tiny['forward']['images_per_s'])} img/s" in rows["eval"]["our figure"]
    assert rows["eval"]["ratio"] == "-"
    vlm = parts["vlm"][1]["main"]
    assert rows["vlm"]["our figure"].startswith(f"{num(vlm['ours']['samples_per_s'])} samples/s")
    assert rows["vlm"]["reference figure"].startswith(f"transformers {num(vlm['plain']['samples_per_s'])} samples/s")
    assert rows["vlm"]["ratio"] == f"{vlm['ratio']:.2f}x"
    assert all(row["notes"].endswith(tuple("0123456789")) for row in rows.values())  # "9 s, load a -> b"


def test_an_empty_report_is_a_failed_row() -> None:
    record = {"name": "loss_dino", "group": "loss", "options": "--batch 8", "status": "ok", "error": None,
              "seconds": 1.0,
              "reports": {"ours": {**saved("loss_dino_torch_fp32_cpu.json"),
                                   "results": [{"batch": 8, "failed": "RuntimeError: out of memory"}]}}}
    row = bench_all_table.table_row(record, {})
    assert record["status"] == "failed" and row["our figure"] == "-" and "out of memory" in row["notes"]


def test_selection_and_settings() -> None:
    parts = bench_all.select(bench_all.preset_parts("cpu"), "train,loss_dino", "train_dino")
    assert [p.name for p in parts] == ["train_clip", "loss_dino"]
    bench_all.apply_setting(parts, "loss_dino.batch=8,16")
    bench_all.apply_setting(parts, "train_clip.vs=")
    bench_all.apply_setting(parts, "train_clip.local-crops=4")
    bench_all.apply_setting(parts, "loss_dino.timeout=7")
    assert parts[1].options["batch"] == ["8", "16"] and parts[1].timeout_s == 7.0
    assert "vs" not in parts[0].options and parts[0].options["local_crops"] == "4"
    argv = bench_all.option_argv({"batch": ["8", "16"], "local_crops": 4})
    assert argv == ["--batch", "8", "16", "--local-crops", "4"]
    for bad in ("eval.models", "nope.batch=1"):
        with pytest.raises(ValueError):
            bench_all.apply_setting(parts, bad)
    with pytest.raises(ValueError, match="unknown part"):
        bench_all.select(parts, "trian", None)


def test_failed_and_timed_out_parts_leave_the_others(tmp_path: Path) -> None:
    """One row per part; the failed and the killed parts say so (with the error's last line); exit code 1."""
    proc = run_all("--preset", "tiny", "--only", "train_clip,loss_dino,vlm", "--set", "loss_dino.batch=0",
                   "--set", "vlm.timeout=1", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    markdown = (tmp_path / "bench_all.md").read_text()
    assert markdown in proc.stdout and "- versions: python " in markdown and "--preset tiny" in markdown
    rows = table_rows(markdown)
    assert list(rows) == ["train_clip", "loss_dino", "vlm"]
    clip = rows["train_clip"]
    assert clip[3].endswith(")") and "samples/s" in clip[3]
    if importlib.util.find_spec("open_clip"):
        assert clip[4].startswith("open_clip ") and clip[5].endswith("x")
    else:
        assert clip[4] == "-" and "open_clip is not importable" in clip[6]
    assert "**failed**" in rows["loss_dino"][6] and "--batch and --repeat must be >= 1" in rows["loss_dino"][6]
    assert rows["loss_dino"][3] == "-" and "--batch 0" in rows["loss_dino"][2]  # its options stand in
    assert "**timed out**" in rows["vlm"][6] and rows["vlm"][3] == "-"
    report = json.loads((tmp_path / "bench_all.json").read_text())
    assert [p["status"] for p in report["parts"]] == ["ok", "failed", "timed out"]
    assert report["parts"][0]["reports"]["main"]["samples_per_s"] > 0
    assert len(report["rows"]) == 3 and report["environment"]["versions"]["torch"] != "absent"
    assert (tmp_path / "parts" / "train_clip.json").is_file() and (tmp_path / "logs" / "vlm.main.stderr.txt").is_file()


def test_unknown_part_is_a_usage_error() -> None:
    proc = run_all("--only", "train,nope", timeout=60)
    assert proc.returncode == 2 and "unknown part(s) nope" in proc.stderr


@pytest.mark.slow
def test_tiny_preset_every_part(tmp_path: Path) -> None:
    """The whole tiny preset (50-75 s on 2 cores): a row per part, each with a figure, exit code 0."""
    proc = run_all("--preset", "tiny", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows((tmp_path / "bench_all.md").read_text())
    assert list(rows) == [p.name for p in bench_all.preset_parts("tiny")]
    dali = bench_all.dali_installed("nvidia.dali")
    for name, row in rows.items():
        assert row[3] != "-" or (name == "data_dali" and not dali), row


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_every_preset_command_parses(preset: str) -> None:
    """The commands of every part (the gpu preset's included, which cannot run here) pass their subcommand's parser."""
    import bench

    parser = bench.build_parser()
    for part in bench_all.preset_parts(preset):
        for extra in part.runs.values():
            argv = [part.group, *bench_all.option_argv({**part.options, **extra}), "--json", "x.json"]
            if part.group == "eval":  # eval.bench parses its own arguments: check the names against its parser
                assert set(part.options) <= {"models", "data", "workers", "repeats"}
                continue
            if part.requires and not bench_all.dali_installed(part.requires):
                continue  # its parser would say that DALI is missing
            args = parser.parse_args(argv)
            if getattr(args, "check", None):
                args.check(parser, args)


def test_gpu_preset_needs_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = run_all("--preset", "gpu", timeout=60)
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr

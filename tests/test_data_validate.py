"""python -m data.validate: every bad-data case has a clear outcome; clean copies; the validation record."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data import synthetic as syn
from data.loader import PretrainLoader, SampleProcessor
from data.shards import expand_shards
from data.transforms import ClipTransform
from data.validate import main, shard_samples, unvalidated, update_manifest, validate_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate_world")
    syn.generate_world(out, samples=48, val_samples=4, shard_size=12, image_size=32, seed=5, workers=2, progress=False)
    return out


def read_samples(shard):
    samples = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            samples.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = tar.extractfile(m).read()
    return samples


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def bad_shards(world, tmp_path):
    """bad-000000: one sample per problem; -01 truncated mid-member; -02 0 bytes; -03 no samples; -04 not a tar;
    -05 cut at a member boundary (no end blocks); -06 clean."""
    good = read_samples(world / "train-000000.tar")
    keys = sorted(good)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(gif, format="GIF")
    edits = {1: ("jpg", b"this is not an image"), 2: ("txt", None), 3: ("jpg", None),
             4: ("jpg", good[keys[4]]["jpg"][:200]), 5: ("txt", b"  \n"), 6: ("json", b"[1, 2"),
             7: ("jpg", gif.getvalue()), 8: ("txt", b"\xff\xfe caption")}
    samples = []
    for i, key in enumerate(keys):
        parts = dict(good[key])
        if i in edits:
            ext, data = edits[i]
            if data is None:
                del parts[ext]
            else:
                parts[ext] = data
        samples.append((key, parts))
    write_tar(tmp_path / "bad-000000.tar", samples)
    whole = (world / "train-000001.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    (tmp_path / "bad-000002.tar").write_bytes(b"")
    write_tar(tmp_path / "bad-000003.tar", [])
    (tmp_path / "bad-000004.tar").write_bytes(b"garbage " * 200)
    (tmp_path / "bad-000005.tar").write_bytes(whole[: 512 * 9])  # 3 complete members, no end-of-archive blocks
    (tmp_path / "bad-000006.tar").write_bytes((world / "train-000002.tar").read_bytes())
    return tmp_path, keys


def test_every_problem_is_counted_with_its_key(bad_shards):
    folder, keys = bad_shards
    results = {r["name"]: r for r in validate_shards(expand_shards(str(folder / "bad-*.tar")),
                                                     ("image", "text", "json"))}
    first = results["bad-000000.tar"]
    assert {(k, p) for k, p, _ in first["bad"]} == {
        (keys[1], "decode_error"), (keys[2], "missing_text"), (keys[3], "missing_image"), (keys[4], "decode_error"),
        (keys[5], "bad_text"), (keys[6], "bad_json"), (keys[7], "unsupported_format"), (keys[8], "bad_text")}
    assert first["samples"] == 12 and first["clean"] == 4
    assert results["bad-000001.tar"]["problems"] == {"truncated_tar": 1} and results["bad-000001.tar"]["clean"] == 6
    assert results["bad-000002.tar"]["problems"] == {"empty_shard": 1}
    assert results["bad-000003.tar"]["problems"] == {"empty_shard": 1}
    assert results["bad-000004.tar"]["problems"] == {"unreadable_shard": 1}
    assert results["bad-000005.tar"]["problems"] == {"truncated_tar": 1} and results["bad-000005.tar"]["clean"] == 0
    assert results["bad-000006.tar"]["problems"] == {} and results["bad-000006.tar"]["clean"] == 12
    problems = []
    assert list(shard_samples(str(folder), problems)) == [] and problems[0][0] == "unreadable_shard"  # a folder
    dino_only = validate_shards([str(folder / "bad-000000.tar")], ("image",))[0]
    assert set(dino_only["problems"]) == {"decode_error", "missing_image", "unsupported_format"}  # captions unjudged


def test_cli_report_and_exit_codes(bad_shards, capsys):
    folder, keys = bad_shards
    assert main([str(folder / "bad-*.tar"), "--workers", "2", "--quiet", "--require", "image,text,json"]) == 1
    out = capsys.readouterr().out
    assert "bad (checked: image, text, json)" in out and "decode_error" in out and f"bad-000000.tar:{keys[1]}" in out
    assert "--rewrite OUT_DIR" in out
    report = json.loads((folder / "validation_report.json").read_text())
    assert report["problems"]["decode_error"] == 2 and report["problems"]["truncated_tar"] == 2
    assert {"shard": "bad-000000.tar", "key": keys[3], "problem": "missing_image",
            "detail": "components: json,txt"} in report["bad_samples"]
    assert report["per_shard"]["bad-000006.tar"]["clean"] == 12
    assert main([str(folder / "nothing-*.tar")]) == 2 and "no shards match" in capsys.readouterr().err
    assert main([str(folder / "bad-000006.tar"), "--require", "image,colour"]) == 2


def test_rewrite_keeps_every_clean_sample_byte_for_byte(bad_shards, tmp_path, world):
    folder, keys = bad_shards
    (folder / "classes.json").write_text('["a"]')
    out = tmp_path / "clean"
    assert main([str(folder / "bad-*.tar"), "--rewrite", str(out), "--quiet", "--require", "image,text,json"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["bad-000000.tar", "bad-000001.tar", "bad-000006.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"bad-000000.tar": 4, "bad-000001.tar": 6,
                                                            "bad-000006.tar": 12}
    assert (out / "classes.json").read_text() == '["a"]'
    original = read_samples(world / "train-000000.tar")
    rewritten = read_samples(out / "bad-000000.tar")
    assert sorted(rewritten) == [keys[0], *keys[9:]] and all(rewritten[k] == original[k] for k in rewritten)
    assert unvalidated(expand_shards(str(out / "*.tar")), ("image", "text")) == []
    loader = PretrainLoader(expand_shards(str(out / "*.tar")), SampleProcessor(ClipTransform(16), text_encoder=len),
                            2, seed=0, workers=0, shuffle_buffer=1)
    it = iter(loader)
    assert sum(len(next(it)) for _ in range(11)) == 22 and loader.skipped == {}  # one pass, nothing skipped
    assert main([str(out / "*.tar"), "--quiet"]) == 0


def test_what_dali_cannot_read_is_a_problem(world, tmp_path):
    """Shards the CPU loader reads but DALI's reader or index does not: caught here, fixed by --rewrite."""
    good = read_samples(world / "train-000000.tar")
    keys = sorted(good)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    samples = [(k, dict(good[k])) for k in keys[:4]]
    samples[1][1]["png"] = png.getvalue()  # jpg and png in one sample
    samples[2] = (keys[2] + " copy", samples[2][1])  # whitespace in the name
    shard = tmp_path / "src" / "odd-000000.tar"
    shard.parent.mkdir()
    write_tar(shard, samples)
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("README")  # no extension: no sample
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    (result,) = validate_shards([str(shard)])
    assert result["problems"] == {"stray_member": 1, "multiple_images": 1, "bad_name": 1} and result["clean"] == 2
    assert main([str(shard), "--quiet"]) == 1 and "has problems" in unvalidated([str(shard)], ("image",))[0][1]

    # --rewrite: the clean copies are recorded even when the sources' folder cannot take a record
    (shard.parent / "validation.json").unlink()
    (shard.parent / "validation.json").mkdir()  # an unwritable record beside the sources
    out = tmp_path / "clean"
    assert main([str(shard), "--rewrite", str(out), "--quiet"]) == 0
    assert unvalidated([str(out / shard.name)], ("image", "text")) == []
    assert json.loads((out / "sizes.json").read_text()) == {shard.name: 2}

    twin = tmp_path / "twin" / shard.name  # same file name in another folder: one output folder cannot hold both
    twin.parent.mkdir()
    twin.write_bytes(shard.read_bytes())
    assert main([f"{shard}::{twin}", "--rewrite", str(tmp_path / "both"), "--quiet"]) == 2


def test_validation_record_says_what_is_missing(world, tmp_path):
    shards = [str(tmp_path / name) for name in ("a-000000.tar", "a-000001.tar")]
    for shard, src in zip(shards, ("train-000000.tar", "train-000001.tar")):
        Path(shard).write_bytes((world / src).read_bytes())
    assert [why for _, why in unvalidated(shards, ("image",))] == ["not validated"] * 2
    update_manifest(validate_shards(shards, ("image",)))
    assert unvalidated(shards, ("image",)) == []
    assert unvalidated(shards, ("image", "text"))[0][1] == "validated without checking text"
    os.utime(shards[1], ns=(1, 1))  # touched since: size + mtime are the record
    assert unvalidated(shards, ("image",)) == [(shards[1], "changed since it was validated")]
    Path(shards[0]).write_bytes(Path(shards[0]).read_bytes()[:5000])
    update_manifest(validate_shards(shards[:1], ("image",)))
    assert unvalidated(shards[:1], ("image",))[0][1].startswith("has problems: truncated_tar 1")


def test_command_line_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "data.validate", str(tmp_path / "none-*.tar")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no shards match") and "Traceback" not in proc.stderr

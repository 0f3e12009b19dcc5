"""Check webdataset shards sample by sample, report the problems, and optionally write clean copies.

    python -m data.validate 'DIR/train-*.tar' [--require image,text] [--workers 8] [--rewrite OUT] [--report FILE]

Every image is fully decoded (PIL) and must be in a format DALI decodes; of the required components,
captions must be non-empty UTF-8, `json` an object, `cls` an integer. Problems are counted per kind
(see PROBLEMS) with the offending keys; the report goes to `validation_report.json` (beside the
shards, or in OUT) and a summary to stdout. `validation.json` beside the shards records each
validated shard (name, size, mtime, counts), which is what `data.backend=dali` checks before it
reads them. `--rewrite OUT` copies every clean sample byte for byte into OUT/<same shard name>
(+ sizes.json, validation.json).
Exit status: 0 all clean (or clean copies written), 1 problems found, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import fcntl
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image

from data.shards import DataError, expand_shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DALI_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000"}  # PIL names of what DALI decodes
REQUIREMENTS = ("image", "text", "json", "label")
PROBLEMS = {  # kind -> what it means; shard-level kinds first
    "unreadable_shard": "the file cannot be opened or is not a tar archive",
    "empty_shard": "the tar holds no sample",
    "truncated_tar": "the tar ends early (the incomplete last sample is dropped)",
    "stray_member": "a file without an extension belongs to no sample (DALI's reader stops on it)",
    "bad_name": "a member name with whitespace (DALI's index files cannot hold it)",
    "multiple_images": "a sample with two image components (DALI and the CPU loader could pick different ones)",
    "duplicate_component": "a sample has the same component twice",
    "missing_image": "no jpg/jpeg/png/webp component",
    "missing_text": "no txt caption", "missing_json": "no json", "missing_label": "no cls label",
    "decode_error": "the image bytes do not decode (corrupt, truncated or not an image)",
    "unsupported_format": "an image format DALI cannot decode (e.g. GIF)",
    "bad_text": "the caption is empty or not UTF-8", "bad_json": "the json is not an object",
    "bad_label": "cls is not a non-negative integer",
}
MANIFEST, REPORT = "validation.json", "validation_report.json"
SIDECARS = ("classes.json", "world.json")  # copied into a rewrite folder
KEY = re.compile(r"^((?:.*/|)[^./]+)\.(.*)$")  # webdataset: key = path up to the basename's first dot
MAX_KEYS = 100_000  # offending keys kept in a report


# ----------------------------------------------------------------------------- reading and checking
def shard_samples(path: str, problems: list[tuple[str, str]]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(ext, bytes), ...]) per sample in file order; shard-level problems are appended to `problems`."""
    try:
        f = open(path, "rb")
    except OSError as e:
        problems.append(("unreadable_shard", e.strerror or str(e)))
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
        except (tarfile.TarError, OSError) as e:
            problems.append(("empty_shard", "0 bytes") if size == 0 else ("unreadable_shard", f"not a tar: {e}"))
            return
        key, members, count = None, [], 0
        try:
            for info in tar:
                match = KEY.match(info.name)
                if not info.isreg() or info.name.rsplit("/", 1)[-1].startswith("."):
                    continue
                if not match:
                    problems.append(("stray_member", info.name[:200]))
                    continue
                data = tar.extractfile(info).read()
                if len(data) < info.size:
                    raise tarfile.ReadError("unexpected end of data")
                if match.group(1) != key:
                    if members:
                        count += 1
                        yield key, members
                    key, members = match.group(1), []
                members.append((match.group(2), data))
            end = tar.offset
        except (tarfile.TarError, EOFError, OSError) as e:
            problems.append(("truncated_tar", f"{e} after {count} complete samples"))
            return
        f.seek(end)
        trailer = f.read(1024)
        if len(trailer) < 1024 or trailer.strip(b"\0"):  # a tar ends with two zero blocks
            problems.append(("truncated_tar", f"no end-of-archive blocks after {count} complete samples"))
            return  # the last sample may have lost components: dropped
        if members:
            yield key, members
        elif not count:
            problems.append(("empty_shard", "no samples"))


def check_image(data: bytes) -> Optional[tuple[str, str]]:
    """None if PIL fully decodes `data` in a format DALI reads, else (problem, detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()
    except Image.UnidentifiedImageError:
        return "decode_error", "not an image PIL recognises"
    except Exception as e:  # PIL raises many types for bad bytes
        return "decode_error", f"{type(e).__name__}: {e}"[:200]
    if fmt not in DALI_FORMATS:
        return "unsupported_format", str(fmt)
    return None


def check_sample(members: list[tuple[str, bytes]], require: tuple[str, ...]) -> Optional[tuple[str, str]]:
    """The first problem of a sample (problem, detail), or None when it is clean for `require`."""
    parts = dict(members)
    if len(parts) < len(members):
        return "duplicate_component", ",".join(sorted(e for e, _ in members))
    images = [e for e in IMAGE_EXTS if e in parts]
    if len(images) > 1:
        return "multiple_images", ",".join(images)
    image = parts[images[0]] if images else None
    present = {"image": image is not None, "text": "txt" in parts, "json": "json" in parts, "label": "cls" in parts}
    for need in REQUIREMENTS:
        if need in require and not present[need]:
            return f"missing_{need}", "components: " + ",".join(sorted(parts))
    if image is not None and (bad := check_image(image)):
        return bad
    if "text" in require:  # components nobody asked for are not judged (a DINO run ignores captions)
        try:
            if not parts["txt"].decode("utf-8").strip():
                return "bad_text", "empty caption"
        except UnicodeDecodeError as e:
            return "bad_text", str(e)[:200]
    if "json" in require:
        try:
            if not isinstance(json.loads(parts["json"]), dict):
                return "bad_json", "not an object"
        except ValueError as e:
            return "bad_json", str(e)[:200]
    if "label" in require:
        text = parts["cls"].decode("ascii", errors="replace").strip()
        if not text.isdigit():
            return "bad_label", repr(text[:40])
    return None


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def validate_shard(path: str, require: tuple[str, ...] = ("image", "text"), rewrite: Optional[str] = None,
                   ) -> dict[str, Any]:
    """Check one shard; with `rewrite` (a folder) write its clean samples to rewrite/<name> (none: no file)."""
    problems: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    bad: list[list[str]] = []
    samples = clean = 0
    out = tmp = None
    if rewrite:
        tmp = Path(rewrite) / f".{Path(path).name}.{os.getpid()}.tmp"
        out = tarfile.open(tmp, "w")
    try:
        for key, members in shard_samples(path, problems):
            samples += 1
            names = [f"{key}.{ext}" for ext, _ in members]
            spaced = next((n for n in names if re.search(r"\s", n)), None)
            problem = ("bad_name", repr(spaced)[:200]) if spaced else check_sample(members, require)
            if problem is None:
                clean += 1
                if out is not None:
                    for ext, data in members:
                        add_member(out, f"{key}.{ext}", data)
                continue
            counts[problem[0]] = counts.get(problem[0], 0) + 1
            bad.append([key, problem[0], problem[1]])
    finally:
        if out is not None:
            out.close()
    for kind, detail in problems:
        counts[kind] = counts.get(kind, 0) + 1
    stat = _stat(path)
    result = {"shard": path, "name": Path(path).name, "size": stat[0], "mtime_ns": stat[1], "samples": samples,
              "clean": clean, "problems": counts, "bad": bad, "shard_problems": [list(p) for p in problems],
              "require": list(require), "written": None}
    if tmp is not None:
        if clean:
            final = Path(rewrite) / Path(path).name
            os.replace(tmp, final)
            result["written"] = {"path": str(final), "size": final.stat().st_size, "mtime_ns": final.stat().st_mtime_ns}
        else:
            tmp.unlink()
    return result


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _job(args: tuple) -> dict[str, Any]:
    return validate_shard(*args)


def validate_shards(shards: list[str], require: tuple[str, ...] = ("image", "text"), workers: int = 1,
                    rewrite: Optional[str] = None, progress: bool = False) -> list[dict[str, Any]]:
    """validate_shard over many shards, `workers` processes, results in shard order."""
    unknown = set(require) - set(REQUIREMENTS)
    if unknown:
        raise DataError(f"unknown requirement(s) {sorted(unknown)}: choose from {', '.join(REQUIREMENTS)}")
    if rewrite:
        if any(Path(s).resolve().parent == Path(rewrite).resolve() for s in shards):
            raise DataError(f"--rewrite {rewrite} is the shards' own folder: write the clean copies elsewhere")
        seen: dict[str, str] = {}
        for shard in shards:
            if seen.setdefault(Path(shard).name, shard) != shard:
                raise DataError(f"--rewrite puts every copy in one folder, but {seen[Path(shard).name]} and {shard} "
                                "share a name: rewrite them in separate runs to separate folders")
        Path(rewrite).mkdir(parents=True, exist_ok=True)
    jobs = [(s, tuple(require), rewrite) for s in shards]
    results: list[dict[str, Any]] = []
    start = time.time()
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        for i, result in enumerate(pool.imap(_job, jobs) if pool else map(_job, jobs), 1):
            results.append(result)
            if progress and (i % max(1, len(jobs) // 20) == 0 or i == len(jobs)):
                print(f"[validate] {i}/{len(jobs)} shards, {sum(r['samples'] for r in results)} samples, "
                      f"{time.time() - start:.0f}s", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


# ----------------------------------------------------------------------------- manifest and report
def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else {"version": 1, "shards": {}}
    except ValueError:
        return {"version": 1, "shards": {}}


def update_manifest(results: list[dict[str, Any]], rewritten: bool = False) -> list[Path]:
    """Record validated shards in validation.json beside them (for `rewritten`: beside the clean copies)."""
    by_folder: dict[Path, dict[str, dict[str, Any]]] = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in results:
        if rewritten:
            if not r["written"]:
                continue
            path, size, mtime = Path(r["written"]["path"]), r["written"]["size"], r["written"]["mtime_ns"]
            entry = {"samples": r["clean"], "clean": r["clean"], "problems": {}}
        else:
            path, size, mtime = Path(r["shard"]), r["size"], r["mtime_ns"]
            entry = {"samples": r["samples"], "clean": r["clean"], "problems": r["problems"]}
        entry.update(size=size, mtime_ns=mtime, require=r["require"], validated_at=now)
        by_folder.setdefault(path.parent, {})[path.name] = entry
    written = []
    for folder, entries in by_folder.items():
        with open(folder / f".{MANIFEST}.lock", "a") as lock:  # two validate runs over one folder: no lost entries
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = read_manifest(folder)
            manifest["shards"].update(entries)
            write_json(folder / MANIFEST, manifest)
        written.append(folder / MANIFEST)
    return written


def unvalidated(shards: list[str], require: tuple[str, ...]) -> list[tuple[str, str]]:
    """(shard, why) for every shard without a current, clean validation covering `require` (cheap: one stat each)."""
    manifests: dict[Path, dict[str, Any]] = {}
    out = []
    for shard in shards:
        path = Path(shard)
        manifest = manifests.setdefault(path.parent, read_manifest(path.parent))
        entry = manifest["shards"].get(path.name)
        if entry is None:
            out.append((shard, "not validated"))
        elif (entry["size"], entry["mtime_ns"]) != _stat(shard):
            out.append((shard, "changed since it was validated"))
        elif entry["problems"]:
            out.append((shard, "has problems: " + ", ".join(f"{k} {v}" for k, v in sorted(entry["problems"].items()))))
        elif set(require) - set(entry["require"]):
            out.append((shard, f"validated without checking {', '.join(sorted(set(require) - set(entry['require'])))}"))
    return out


def build_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, int] = {}
    for r in results:
        for kind, n in r["problems"].items():
            totals[kind] = totals.get(kind, 0) + n
    bad = [{"shard": r["name"], "key": k, "problem": p, "detail": d} for r in results for k, p, d in r["bad"]]
    return {"shards": len(results), "samples": sum(r["samples"] for r in results),
            "clean": sum(r["clean"] for r in results), "problems": dict(sorted(totals.items())),
            "bad_shards": [{"shard": r["name"], "problem": p, "detail": d}
                           for r in results for p, d in r["shard_problems"]],
            "bad_samples": bad[:MAX_KEYS], "bad_samples_truncated": len(bad) > MAX_KEYS,
            "require": results[0]["require"] if results else [], "per_shard": {
                r["name"]: {"samples": r["samples"], "clean": r["clean"], "problems": r["problems"]} for r in results},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def summary(report: dict[str, Any], show: int = 10) -> str:
    lines = [f"validated {report['shards']} shard(s), {report['samples']} samples: {report['clean']} clean, "
             f"{report['samples'] - report['clean']} bad (checked: {', '.join(report['require'])})"]
    for kind, n in report["problems"].items():
        lines.append(f"  {kind:20s} {n:8d}  {PROBLEMS.get(kind, '')}")
    for item in report["bad_shards"][:show]:
        lines.append(f"  shard {item['shard']}: {item['problem']} ({item['detail']})")
    for item in report["bad_samples"][:show]:
        lines.append(f"  sample {item['shard']}:{item['key']}: {item['problem']} ({item['detail']})")
    more = len(report["bad_samples"]) - show
    if more > 0:
        lines.append(f"  ... {more} more bad samples in the report")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def write_outputs(results: list[dict[str, Any]], report_path: Path, rewrite: Optional[str]) -> dict[str, Any]:
    """Report file, manifest(s) and, for a rewrite, sizes.json + sidecars in the output folder."""
    report = build_report(results)
    if rewrite:  # the clean copies' records first: they are what the work produced
        update_manifest(results, rewritten=True)
        sizes_path = Path(rewrite) / "sizes.json"
        sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
        sizes.update({r["name"]: r["clean"] for r in results if r["written"]})
        write_json(sizes_path, sizes)
        for folder in {Path(r["shard"]).parent for r in results}:
            for name in SIDECARS:
                if (folder / name).is_file() and not (Path(rewrite) / name).exists():
                    shutil.copyfile(folder / name, Path(rewrite) / name)
    write_json(report_path, report)
    try:
        update_manifest(results)  # the sources: clean or not, as they are
    except OSError as e:
        if not rewrite:
            raise
        print(f"[validate] warning: could not record the sources' validation beside them ({e}); the clean "
              "copies are recorded", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="brace pattern, glob or several joined by '::'")
    parser.add_argument("--require", default="image,text",
                        help=f"components every sample needs, from {','.join(REQUIREMENTS)} (default image,text; "
                             f"DINO-only data: image; labeled shards: image,label)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--rewrite", metavar="OUT", help="write the clean samples to OUT/<shard name>")
    parser.add_argument("--report", help=f"report path (default: {REPORT} in OUT, else beside the shards)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        shards = expand_shards(args.shards)
        if any("://" in s or s.startswith("pipe:") for s in shards):
            raise DataError("data.validate reads local shard files; copy remote shards first")
        require = tuple(r.strip() for r in args.require.split(",") if r.strip())
        results = validate_shards(shards, require, args.workers, args.rewrite, progress=not args.quiet)
        report_path = Path(args.report or Path(args.rewrite or Path(shards[0]).parent) / REPORT)
        report = write_outputs(results, report_path, args.rewrite)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"report: {report_path}")
    if args.rewrite:
        written = [r for r in results if r["written"]]
        print(f"wrote {report['clean']} clean samples in {len(written)} shard(s) to {args.rewrite}"
              + (f"; {len(results) - len(written)} shard(s) had no clean sample and were not written (use a glob "
                 f"such as '{args.rewrite}/*.tar')" if len(written) < len(results) else ""))
        return 0
    if report["clean"] < report["samples"] or report["problems"]:
        print(f"to train on the clean samples: python -m data.validate '{args.shards}' --rewrite OUT_DIR, "
              f"then data.train=OUT_DIR/...")
        return 1
    print("all clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())

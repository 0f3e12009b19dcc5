"""Ingest image data as webdataset shards.

    python -m data.convert imagefolder DIR --out SHARDS [--split train] [--shard-size 1000] [--workers 8]
    python -m data.convert datacomp DIR

`imagefolder`: an ImageFolder tree (DIR/<class>/**/<image>, e.g. ImageNet's train/ and val/ after the
usual val re-layout) -> labeled shards SHARDS/{split}-NNNNNN.tar with KEY.jpg (png/webp as the bytes
are; other formats re-encoded to png), KEY.cls (class index, ASCII), KEY.json ({"label", "class_name",
"source_path", "width", "height"}); plus classes.json (class names in index order: sorted folder
names, or the existing classes.json in SHARDS, so train and val agree), sizes.json and validation.json
(every image was decoded while converting; unreadable files are skipped and listed). Samples are
shuffled with --seed (class-sorted shards make poor training batches); --no-shuffle keeps the order.

`datacomp`: img2dataset output (NNNNN.tar with KEY.jpg/.txt/.json carrying `uid`, extra components
and NNNNN_stats.json / .parquet beside) is read as it is; this writes DIR/sizes.json (from the stats
files, else tar headers) and reports the components found and the next steps.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from data.shards import DataError, _count_tar_samples
from data.validate import add_member, check_sample, update_manifest, write_json

SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}  # torchvision's
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; anything else -> png
LABELED_REQUIRE = ("image", "label", "json")


# ----------------------------------------------------------------------------- imagefolder
def find_classes(root: Path, classes_file: Optional[Path]) -> list[str]:
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders (expected DIR/<class>/<image>)")
    if classes_file is None or not classes_file.is_file():
        return folders
    classes = json.loads(classes_file.read_text())
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise DataError(f"class folder(s) {unknown[:5]} of {root} are not in {classes_file}; convert into a fresh "
                        f"--out folder or fix the class list")
    return classes


def list_images(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path relative to root, label) of every image file, sorted per class (torchvision ImageFolder order)."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for name in sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for f in sorted(files):
                if Path(f).suffix.lower() in SOURCE_EXTS:
                    items.append((str(Path(folder, f).relative_to(root)), index[name]))
    return items


def image_member(path: Path) -> tuple[str, bytes, int, int]:
    """(ext, bytes, width, height) to store for one source image; raises ValueError when it does not decode."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, width, height = im.format, im.width, im.height
            if fmt not in KEEP_FORMATS:  # BMP, PPM, TIFF, GIF...: re-encode losslessly
                buffer = io.BytesIO()
                im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buffer, format="PNG")
                return "png", buffer.getvalue(), width, height
    except Image.UnidentifiedImageError:
        raise ValueError("not an image PIL recognises") from None
    except Exception as e:  # PIL raises many types for bad bytes
        raise ValueError(f"{type(e).__name__}: {e}"[:200]) from None
    return KEEP_FORMATS[fmt], data, width, height


def _write_labeled_shard(job: tuple) -> dict[str, Any]:
    root, out_path, items, classes, start = job
    written, skipped = 0, []
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i, (rel, label) in enumerate(items):
            key = f"{Path(out_path).name.split('-')[0]}_{start + i:08d}"
            try:
                ext, data, width, height = image_member(Path(root) / rel)
            except (OSError, ValueError) as e:
                skipped.append({"source_path": rel, "problem": str(e)})
                continue
            meta = {"label": label, "class_name": classes[label], "source_path": rel, "width": width, "height": height}
            members = [(ext, data), ("cls", str(label).encode()), ("json", json.dumps(meta).encode())]
            problem = check_sample(members, LABELED_REQUIRE)
            if problem is not None:
                skipped.append({"source_path": rel, "problem": f"{problem[0]}: {problem[1]}"})
                continue
            for ext_, payload in members:
                add_member(tar, f"{key}.{ext_}", payload)
            written += 1
    if not written:
        tmp.unlink()
        return {"shard": out_path, "samples": 0, "skipped": skipped}
    os.replace(tmp, out_path)
    return {"shard": out_path, "samples": written, "skipped": skipped}


def convert_imagefolder(root: str, out: str, split: str = "train", shard_size: int = 1000, workers: int = 1,
                        seed: int = 0, shuffle: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write labeled shards of an ImageFolder tree (see the module docstring); returns a summary."""
    src, dst = Path(root).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise DataError(f"--split must be letters, digits or _, got {split!r}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    dst.mkdir(parents=True, exist_ok=True)
    old = sorted(dst.glob(f"{split}-[0-9]*.tar"))
    if old and not overwrite:
        raise DataError(f"{dst} already holds {len(old)} {split}-NNNNNN.tar shard(s): pass --overwrite or "
                        f"another --out")
    for path in old:
        path.unlink()
    classes = find_classes(src, dst / "classes.json")
    items = list_images(src, classes)
    if not items:
        raise DataError(f"no images ({', '.join(sorted(SOURCE_EXTS))}) under {src}")
    if shuffle:
        random.Random(seed).shuffle(items)
    jobs = [(str(src), str(dst / f"{split}-{n:06d}.tar"), items[i:i + shard_size], classes, i)
            for n, i in enumerate(range(0, len(items), shard_size))]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_write_labeled_shard, jobs)
    else:
        results = [_write_labeled_shard(j) for j in jobs]
    written = [r for r in results if r["samples"]]
    write_json(dst / "classes.json", classes)
    sizes_path = dst / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    sizes = {k: v for k, v in sizes.items() if not re.fullmatch(rf"{split}-\d+\.tar", k)}
    sizes.update({Path(r["shard"]).name: r["samples"] for r in written})
    write_json(sizes_path, dict(sorted(sizes.items())))
    update_manifest([{"shard": r["shard"], "size": os.stat(r["shard"]).st_size,
                      "mtime_ns": os.stat(r["shard"]).st_mtime_ns, "samples": r["samples"], "clean": r["samples"],
                      "problems": {}, "require": list(LABELED_REQUIRE), "written": None} for r in written])
    skipped = [s for r in results for s in r["skipped"]]
    if skipped:
        write_json(dst / f"{split}_skipped.json", skipped)
    return {"images": len(items), "written": sum(r["samples"] for r in written), "classes": len(classes),
            "shards": len(written), "skipped": skipped, "out": str(dst), "split": split}


# ----------------------------------------------------------------------------- datacomp (img2dataset output)
def prepare_datacomp(root: str) -> dict[str, Any]:
    """Write sizes.json for img2dataset shards and summarise their components (see the module docstring)."""
    folder = Path(root).expanduser()
    shards = sorted(p for p in folder.glob("*.tar") if not p.name.startswith("."))
    if not shards:
        raise DataError(f"no .tar shards in {folder} (expected img2dataset output: 00000.tar, 00001.tar, ...)")
    sizes: dict[str, int] = {}
    for shard in shards:
        stats = folder / f"{shard.stem}_stats.json"
        count = None
        if stats.is_file():
            try:
                count = int(json.loads(stats.read_text())["successes"])
            except (ValueError, KeyError, TypeError):
                count = None
        sizes[shard.name] = count if count is not None else _count_tar_samples(str(shard))
    write_json(folder / "sizes.json", sizes)
    components, uid, samples = Counter(), 0, 0
    with tarfile.open(shards[0]) as tar:  # the first shard stands for the rest
        groups: dict[str, dict[str, bytes]] = {}
        for member in tar:
            if member.isreg() and "." in member.name.rsplit("/", 1)[-1]:
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read() if ext == "json" else b""
    for parts in groups.values():
        samples += 1
        components.update(parts.keys())
        try:
            uid += "uid" in json.loads(parts.get("json", b"{}") or b"{}")
        except ValueError:
            pass
    numbers = [s.stem for s in shards]
    pattern = (f"{folder}/{{{numbers[0]}..{numbers[-1]}}}.tar" if all(n.isdigit() for n in numbers)
               and len(numbers) == int(numbers[-1]) - int(numbers[0]) + 1 else f"{folder}/*.tar")
    return {"shards": len(shards), "samples": sum(sizes.values()), "pattern": pattern,
            "components": {k: v / max(samples, 1) for k, v in components.most_common()},
            "uid": uid / max(samples, 1), "sampled_shard": shards[0].name}


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    folder = commands.add_parser("imagefolder", help="ImageFolder tree -> labeled shards")
    folder.add_argument("dir")
    folder.add_argument("--out", required=True)
    folder.add_argument("--split", default="train", help="shard name prefix (train, val, ...)")
    folder.add_argument("--shard-size", type=int, default=1000)
    folder.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    folder.add_argument("--seed", type=int, default=0)
    folder.add_argument("--no-shuffle", action="store_true")
    folder.add_argument("--overwrite", action="store_true", help="replace this split's existing shards in --out")
    datacomp = commands.add_parser("datacomp", help="img2dataset output -> sizes.json + a component report")
    datacomp.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "imagefolder":
            s = convert_imagefolder(args.dir, args.out, args.split, args.shard_size, args.workers, args.seed,
                                    not args.no_shuffle, args.overwrite)
            print(f"{s['written']} of {s['images']} images in {s['classes']} classes -> {s['shards']} shard(s) "
                  f"{s['out']}/{s['split']}-NNNNNN.tar (+ classes.json, sizes.json, validation.json)")
            if s["skipped"]:
                first = s["skipped"][0]
                print(f"skipped {len(s['skipped'])} unreadable image(s), listed in {s['out']}/{s['split']}_skipped"
                      f".json; e.g. {first['source_path']}: {first['problem']}")
        else:
            s = prepare_datacomp(args.dir)
            parts = ", ".join(f"{k} {v:.0%}" for k, v in s["components"].items())
            print(f"{s['shards']} shards, {s['samples']} samples (sizes.json written); components in "
                  f"{s['sampled_shard']}: {parts}; json with uid: {s['uid']:.0%}")
            if s["components"].get("txt", 0) < 1:
                print("warning: some samples have no txt caption (the CPU loader skips them; validate for DALI)")
            print(f"train with data.train='{s['pattern']}'; for data.backend=dali first run: python -m data.validate "
                  f"'{s['pattern']}' --workers 16 [--rewrite CLEAN_DIR]")
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

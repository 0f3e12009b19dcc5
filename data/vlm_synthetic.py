"""LLaVA-1.5 instruction data from the synthetic world's train split, and the synthetic VMCBench from its val split.

    python -m data.vlm_synthetic --out data_cache/vlm [--seed 0] [--stage1 N] [--stage2 N] [--dev N] [--test N]
                                 [--image-size 64] [--shards] [--example-grids benchmarks/results]

OUT/stage1.json                   as blip_laion_cc_sbu_558k.json: "<image>\\n" + a describe-instruction -> a caption
OUT/stage2.json                   as llava_v1_5_mix665k.json: multi-turn open, short and VMCBench-format
                                  multiple-choice Q&A about the seven benchmark categories' scene kinds,
                                  plus text-only conversations (no "image" key) every 20th record
OUT/images/stage{1,2}/*.png       image paths in the JSON are relative to OUT/images (LLaVA's --image_folder)
OUT/shards/stage{1,2}-NNNNNN.tar  with --shards: {key}.png (absent for text-only) + {key}.json (the record)
OUT/vmcbench/data/...             the benchmark (data/vmcbench_synthetic.py)
OUT/manifest.json                 the arguments and paths; written last, so its presence means complete

Stage-1 captions are factual, built from the factors, not the world's alt-text (`make_caption`): LLaVA's
558K captions are BLIP's descriptions of what is visible, and reusing the exact strings CLIP was trained
on would hand the CLIP tower an advantage over DINO that the comparison must not have.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from tqdm import tqdm

from data.synthetic import STYLE_PHRASES, WORDS, make_sample
from data.validate import add_member, write_json
from data.vlm_scenes import (CATEGORIES, SHORT_INSTRUCTION, item_rng, make_item, mc_prompt, object_phrase,
                             save_example_grid, where)
from data.vmcbench_synthetic import (DEFAULT_DEV_QUESTIONS, DEFAULT_TEST_QUESTIONS, check_question_counts, png_bytes,
                                     save_benchmark_examples, vmcbench_paths, write_vmcbench)

FORMAT_VERSION = 1
DEFAULT_STAGE1_SAMPLES = 2000
DEFAULT_STAGE2_SAMPLES = 3000
SHARD_SIZE = 1000
TEXT_ONLY_EVERY = 20  # record i is text-only when i % 20 == 19 (the 665K mix has ~6% text-only)
OUR_NAMES = {"images", "shards", "vmcbench", "stage1.json", "stage2.json", "manifest.json"}
FILES_CHECKED = ("stage1_json", "stage2_json", "vmcbench_dev_parquet", "vmcbench_test_parquet",
                 "vmcbench_dev_tsv", "vmcbench_test_tsv")  # besides the manifest, before calling data up to date
DESCRIBE_INSTRUCTIONS = (  # LLaVA's brief-description prompts (the 558K set's instructions)
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.", "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.")
POLYGON_SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}


# ----------------------------------------------------------------------------- records

def factual_caption(factors: dict, rng) -> str:
    """'Three red stars with the word "apple" on a striped background.' (every factor, varied order)."""
    obj = object_phrase(factors)
    if factors["count"] == 1 and rng.random() < 0.5:
        obj += f" in the {where(factors['position'])}"
    background = f"a {STYLE_PHRASES[factors['style']]} background"
    word = f'the word "{factors["word"]}"' if factors.get("word") else None
    if word and rng.random() < 0.5:
        text = f"{obj} and {word} on {background}"
    elif word:
        text = f"{word} written next to {obj} on {background}"
    else:
        text = f"{obj} on {background}"
    return text[0].upper() + text[1:] + "."


def stage1_record(seed: int, index: int, image_size: int):
    """(record, image) for world train sample `index`."""
    image, _alt_text, factors = make_sample(seed, "train", index, image_size)
    rng = item_rng(seed, "train", "stage1", index, "caption")
    key = f"stage1-{index:09d}"
    record = {"id": key, "image": f"stage1/{index:09d}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(DESCRIBE_INSTRUCTIONS)},
        {"from": "gpt", "value": factual_caption(factors, rng)}]}
    return record, image


def _text_only_turns(rng) -> list[tuple[str, str]]:
    """Plain-language turns about the world's vocabulary, as the 665K mix keeps text-only chats."""
    def one() -> tuple[str, str]:
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        if kind == 1:
            shape = rng.choice(sorted(POLYGON_SIDES))
            return f"How many sides does a {shape} have?", f"A {shape} has {POLYGON_SIDES[shape]} sides."
        if kind == 2:
            word = rng.choice(WORDS)
            return f'Spell the word "{word}" backwards.', f'"{word}" backwards is "{word[::-1]}".'
        first, second = rng.sample(WORDS, 2)
        return (f"Which comes first in alphabetical order, {first} or {second}?",
                f"{min(first, second).capitalize()} comes first.")
    return [one() for _ in range(rng.randint(1, 3))]


def stage2_record(seed: int, index: int, image_size: int):
    """(record, image or None): every 20th is text-only, the others go round the seven categories."""
    key = f"stage2-{index:09d}"
    rng = item_rng(seed, "train", "stage2", index, "turns")
    if index % TEXT_ONLY_EVERY == TEXT_ONLY_EVERY - 1:
        turns = _text_only_turns(rng)
        image = None
    else:
        image_record = index - (index + 1) // TEXT_ONLY_EVERY
        category = CATEGORIES[image_record % len(CATEGORIES)]
        item = make_item(category, seed, "train", image_record // len(CATEGORIES), image_size)
        candidates = list(item.open_qa) + [(f"{q}\n{SHORT_INSTRUCTION}", a) for q, a in item.short_qa]
        candidates = [turn for turn in candidates if turn[0].split("\n")[0] != item.question]
        # the multiple-choice turn first, right after the image as in the benchmark: no earlier turn gives it away
        turns = [(mc_prompt(item.question, item.options), item.answer)]
        turns += rng.sample(candidates, rng.randint(1, min(3, len(candidates))))
        image = item.image
    conversations = []
    for number, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if image is not None and number == 0 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    where_image = {} if image is None else {"image": f"stage2/{index:09d}.png"}
    return {"id": key, **where_image, "conversations": conversations}, image


# ----------------------------------------------------------------------------- writing

class _ShardWriter:
    """stage{N}-{000000..}.tar of SHARD_SIZE records each, every tar renamed into place when full."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.names = folder, prefix, []
        self.tar, self.count = None, 0

    def add(self, record: dict, png: bytes | None) -> None:
        if self.tar is None:
            self.partial = self.folder / f"{self.prefix}-{len(self.names):06d}.tar.partial"
            self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)
        if png is not None:
            add_member(self.tar, f"{record['id']}.png", png)
        add_member(self.tar, f"{record['id']}.json", json.dumps(record, sort_keys=True).encode())
        self.count += 1
        if self.count == SHARD_SIZE:
            self.close()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.partial, self.partial.with_suffix(""))
            self.names.append(self.partial.with_suffix("").name)
            self.tar, self.count = None, 0


def _write_stage(out: Path, stage: int, samples: int, seed: int, image_size: int, shards: bool,
                 progress: bool) -> None:
    make_record = stage1_record if stage == 1 else stage2_record
    (out / "images" / f"stage{stage}").mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out / "shards", f"stage{stage}") if shards else None
    records = []
    for index in tqdm(range(samples), unit="rec", desc=f"stage {stage}", disable=not progress):
        record, image = make_record(seed, index, image_size)
        png = png_bytes(image) if image is not None else None
        if png is not None:
            (out / "images" / record["image"]).write_bytes(png)
        if writer:
            writer.add(record, png)
        records.append(record)
    if writer:
        writer.close()
    write_json(out / f"stage{stage}.json", records)


def _relative_paths(arguments: dict) -> dict[str, str | None]:
    """Every output's path relative to OUT (None: not written), as stored in manifest.json."""
    paths = {"root": ".", "image_folder": "images", "stage1_json": "stage1.json",
             "stage2_json": "stage2.json", "stage1_shards": None, "stage2_shards": None,
             **vmcbench_paths("vmcbench"), "manifest": "manifest.json"}
    if arguments["shards"]:
        for stage in (1, 2):
            last = (arguments[f"stage{stage}_samples"] - 1) // SHARD_SIZE
            paths[f"stage{stage}_shards"] = f"shards/stage{stage}-{{000000..{last:06d}}}.tar"
    return paths


def _absolute(out: Path, relative: dict[str, str | None]) -> dict[str, str | None]:
    return {key: None if path is None else os.path.normpath(out / path) for key, path in relative.items()}


def vlm_data_paths(out_dir: str | os.PathLike) -> dict[str, str | None]:
    """The paths of finished data (read from its manifest); for ranks other than the one that made it."""
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no VLM data in {out_dir} (no manifest.json): run "
                                f"`python -m data.vlm_synthetic --out {out_dir}` or ensure_vlm_data on rank 0 first")
    return _absolute(Path(out_dir), json.loads(manifest.read_text())["paths"])


def ensure_vlm_data(out_dir: str | os.PathLike, *, seed: int = 0, stage1_samples: int = DEFAULT_STAGE1_SAMPLES,
                    stage2_samples: int = DEFAULT_STAGE2_SAMPLES, image_size: int = 64,
                    val_questions: int = DEFAULT_DEV_QUESTIONS, test_questions: int = DEFAULT_TEST_QUESTIONS,
                    shards: bool = False, progress: bool = False, log=None) -> dict[str, str | None]:
    """Make the instruction data and the benchmark (dev = `val_questions`) unless OUT/manifest.json already
    records these arguments; returns the paths. Call it on rank 0 and have the others wait (a barrier),
    then read vlm_data_paths; concurrent callers on one file system are serialised by a file lock."""
    arguments = {"format_version": FORMAT_VERSION, "seed": seed, "stage1_samples": stage1_samples,
                 "stage2_samples": stage2_samples, "image_size": image_size, "dev_questions": val_questions,
                 "test_questions": test_questions, "shards": bool(shards)}
    for name in ("stage1_samples", "stage2_samples"):
        if arguments[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {arguments[name]}")
    if not 32 <= image_size <= 1024:
        raise ValueError(f"image_size must be between 32 and 1024, got {image_size}")
    check_question_counts(val_questions, test_questions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = out / "manifest.json"
        paths = _absolute(out, _relative_paths(arguments))
        if (manifest.is_file() and json.loads(manifest.read_text()).get("arguments") == arguments
                and all(Path(paths[key]).exists() for key in FILES_CHECKED)):
            return paths
        strangers = sorted(p.name for p in out.iterdir() if p.name not in OUR_NAMES and not p.name.startswith("."))
        if strangers:
            raise FileExistsError(f"{out} holds files that are not VLM data ({', '.join(strangers[:3])}); "
                                  f"choose an empty or dedicated --out folder")
        manifest.unlink(missing_ok=True)  # first: an interrupted rebuild must not look complete
        for name in ("images", "shards", "vmcbench"):
            shutil.rmtree(out / name, ignore_errors=True)
        if log:
            log(f"generating VLM data in {out}: stage 1 {stage1_samples}, stage 2 {stage2_samples}, "
                f"VMCBench dev {val_questions} + test {test_questions} at {image_size} px")
        if shards:
            (out / "shards").mkdir()
        _write_stage(out, 1, stage1_samples, seed, image_size, shards, progress)
        _write_stage(out, 2, stage2_samples, seed, image_size, shards, progress)
        write_vmcbench(out / "vmcbench", seed=seed, dev=val_questions, test=test_questions,
                       image_size=image_size, progress=progress)
        write_json(manifest, {"generator": "data.vlm_synthetic", "arguments": arguments,
                              "paths": _relative_paths(arguments)})
        return paths


def _compact(turn: str) -> str:
    """A turn on one line for the example grid: the MC prompt as 'question A. x B. y ...'."""
    lines = turn.replace("<image>\n", "").replace(SHORT_INSTRUCTION, "(short)").split("\n")
    if lines[0].startswith("Question: "):
        return lines[0][len("Question: "):] + " " + " ".join(lines[2:6])
    return " ".join(lines)


def save_training_examples(path: str | os.PathLike, seed: int = 0, image_size: int = 64, per_category: int = 3) -> None:
    """A grid PNG of stage-2 training images: `per_category` records of each category, first two turns."""
    examples = []
    for index in range(per_category * len(CATEGORIES) * 2):
        record, image = stage2_record(seed, index, image_size)
        if image is not None and len(examples) < per_category * len(CATEGORIES):
            turns = [_compact(t["value"]) for t in record["conversations"][:4]]
            examples.append((image, "\n".join(f"{'Q' if i % 2 == 0 else 'A'}: {t}" for i, t in enumerate(turns))))
    save_example_grid(examples, path, columns=len(CATEGORIES), text_lines=9)


# ----------------------------------------------------------------------------- CLI

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(f"{self.prog}: error: {message}")


def main(argv: list[str] | None = None) -> dict:
    parser = _OneLineParser(prog="python -m data.vlm_synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (dedicated to this data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1", type=int, default=DEFAULT_STAGE1_SAMPLES, help="stage-1 caption records")
    parser.add_argument("--stage2", type=int, default=DEFAULT_STAGE2_SAMPLES, help="stage-2 instruction records")
    parser.add_argument("--dev", type=int, default=DEFAULT_DEV_QUESTIONS, help="VMCBench dev questions")
    parser.add_argument("--test", type=int, default=DEFAULT_TEST_QUESTIONS, help="VMCBench test questions")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shards", action="store_true", help="also write webdataset shards of both stages")
    parser.add_argument("--example-grids", default=None, metavar="DIR",
                        help="also save vmcbench_synthetic_samples.png and vlm_synthetic_samples.png in DIR")
    args = parser.parse_args(argv)
    generated = []
    start = time.perf_counter()
    try:
        paths = ensure_vlm_data(args.out, seed=args.seed, stage1_samples=args.stage1, stage2_samples=args.stage2,
                                image_size=args.image_size, val_questions=args.dev, test_questions=args.test,
                                shards=args.shards, progress=sys.stderr.isatty(), log=generated.append)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"{parser.prog}: error: {error}") from None
    seconds = time.perf_counter() - start
    if args.example_grids:
        Path(args.example_grids).mkdir(parents=True, exist_ok=True)
        save_benchmark_examples(Path(args.example_grids) / "vmcbench_synthetic_samples.png", args.seed, args.image_size)
        save_training_examples(Path(args.example_grids) / "vlm_synthetic_samples.png", args.seed, args.image_size)
    total = args.stage1 + args.stage2 + args.dev + args.test
    print(f"stage 1: {args.stage1} records -> {paths['stage1_json']}; stage 2: {args.stage2} -> {paths['stage2_json']}; "
          f"images in {paths['image_folder']}; VMCBench dev {args.dev} + test {args.test} -> {paths['vmcbench']}"
          + (f"; shards {paths['stage1_shards']} {paths['stage2_shards']}" if args.shards else "")
          + (f"; generated in {seconds:.1f} s ({total / seconds:.0f} samples/s)" if generated
             else "; already up to date (same arguments in manifest.json)"), file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()

"""The VLM stage's synthetic instruction data (LLaVA format) and synthetic VMCBench (both layouts)."""
import base64
import csv
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data.vlm_scenes as scenes
import data.vlm_synthetic as vlm
from data.synthetic import COLORS, make_sample
from data.vlm_scenes import CATEGORIES, LETTERS, make_item, world_index
from data.vmcbench_synthetic import TEST_FIRST_NUMBER, benchmark_items

SMALL = dict(seed=0, stage1_samples=30, stage2_samples=90, image_size=64, val_questions=56, test_questions=14,
             shards=True)
MC_FORMAT = re.compile(r"^(?:<image>\n)?Question: (?P<q>[^\n]+)\nOptions:\nA\. (?P<A>[^\n]+)\nB\. (?P<B>[^\n]+)\n"
                       r"C\. (?P<C>[^\n]+)\nD\. (?P<D>[^\n]+)\nAnswer with the option's letter from the given "
                       r"choices directly\.$")


def _generate(folder: Path) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vlm, "SHARD_SIZE", 40)  # several shards from a few records
        return vlm.ensure_vlm_data(folder, **SMALL)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("vlm") / "out")


def _records(paths, stage):
    return json.loads(Path(paths[f"stage{stage}_json"]).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_records_are_llava_format(made):
    stage1, stage2 = _records(made, 1), _records(made, 2)
    assert len(stage1) == 30 and len(stage2) == 90
    for record in stage1 + stage2:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        text = "".join(t["value"] for t in turns)
        if "image" in record:
            assert (Path(made["image_folder"]) / record["image"]).is_file()
            assert turns[0]["value"].startswith("<image>\n") and text.count("<image>") == 1
        else:
            assert "<image>" not in text
    assert all(len(r["conversations"]) == 2 and "image" in r for r in stage1)
    assert {r["conversations"][0]["value"][len("<image>\n"):] for r in stage1} <= set(vlm.DESCRIBE_INSTRUCTIONS)
    assert sum("image" not in r for r in stage2) == 90 // vlm.TEXT_ONLY_EVERY
    assert len({r["id"] for r in stage1 + stage2}) == 120
    for index, record in enumerate(stage1):  # factual captions name the world sample's shape and colour
        factors = make_sample(0, "train", index, 32)[2]
        caption = record["conversations"][1]["value"].lower()
        assert factors["color"] in caption and factors["shape"][:4] in caption
        assert (factors["word"] or "") in caption


def test_stage2_multiple_choice_is_vmcbench_format_and_right(made):
    letters_by_category, seen = Counter(), Counter()
    stage2 = _records(made, 2)
    for index, record in enumerate(stage2):
        if "image" not in record:
            continue
        mc = [(h["value"], g["value"]) for h, g in zip(record["conversations"][::2], record["conversations"][1::2])
              if "Options:" in h["value"]]
        assert len(mc) == 1 and "Options:" in record["conversations"][0]["value"]
        prompt, letter = mc[0]
        match = MC_FORMAT.match(prompt)
        assert match and letter in LETTERS
        image_record = index - (index + 1) // vlm.TEXT_ONLY_EVERY
        category = CATEGORIES[image_record % 7]
        item = make_item(category, 0, "train", image_record // 7, 64)
        assert match["q"] == item.question and match[letter] == item.options[LETTERS.index(item.answer)]
        letters_by_category[category, letter] += 1
        seen[category] += 1
    assert set(seen) == set(CATEGORIES)
    assert max(letters_by_category.values()) <= 4  # ~12 questions per category, blocks of 4 balanced


def _truth(item) -> str:
    """The right option recomputed from the world or the drawn facts, independently of the builder."""
    facts, question = item.facts, item.question
    if item.category in ("synthetic_shape", "synthetic_color"):
        factors = make_sample(0, "val", world_index(item.category, item.number), 32)[2]
        assert facts["factors"] == {**factors, "word": facts["factors"]["word"]}  # a hiding word may be dropped
        assert facts["factors"]["word"] in (None, factors["word"])
        return factors["shape" if item.category == "synthetic_shape" else "color"]
    if item.category == "synthetic_word":
        world = make_sample(0, "val", world_index(item.category, item.number), 32)[2]
        assert world["word"] in (None, facts["factors"]["word"])
        return facts["factors"]["word"]
    if item.category == "synthetic_count":
        factors = facts["factors"]
        centres = [factors["position"], *factors["other_positions"]]
        gaps = [((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 for i, a in enumerate(centres) for b in centres[:i]]
        assert all(g >= 2.2 * factors["scale"] for g in gaps)  # no two objects touch: the count is unambiguous
        return str(len(centres))
    if item.category == "synthetic_compare":
        names = [f"the {c} {s}" for c, s in zip(facts["colors"], facts["shapes"])]
        pixels = [list(item.image.getdata()).count(COLORS[c]) for c in facts["colors"]]
        assert pixels == facts["areas"]  # the larger object has >= 2x the other's pixels, not only the radius
        larger = facts["radii"].index(max(facts["radii"]))
        assert facts["areas"][larger] >= 2 * facts["areas"][1 - larger]
        (x0, y0), (x1, y1) = facts["centres"]
        if question.startswith("Where"):
            return ("To the left" if x0 < x1 else "To the right") if facts["axis"] == "horizontal" else \
                ("Above" if y0 < y1 else "Below")
        key = {"larger": facts["radii"][0] - facts["radii"][1], "smaller": facts["radii"][1] - facts["radii"][0],
               "on the left": x1 - x0, "on the right": x0 - x1, "at the top": y1 - y0, "at the bottom": y0 - y1}
        return names[0] if key[question[len("Which object is "):-1]] > 0 else names[1]
    if item.category == "synthetic_chart":
        colors, values = facts["colors"], facts["values"]
        if "tallest" in question or "shortest" in question:
            pick = max if "tallest" in question else min
            return colors[values.index(pick(values))]
        return str(values[colors.index(question.split()[-2])])
    words, values = facts["words"], facts["values"]
    if question.startswith("What is the value for"):
        return str(values[words.index(question.split()[-1][:-1])])
    if "highest" in question or "lowest" in question:
        return words[values.index((max if "highest" in question else min)(values))]
    return words[values.index(int(question.split()[-1][:-1]))]


def test_benchmark_answers_right_and_letters_balanced():
    letters, kinds = Counter(), set()
    for item in benchmark_items(0, "dev", 112, 64):
        assert len(set(item.options)) == 4
        assert item.options[LETTERS.index(item.answer)] == _truth(item), (item.category, item.question)
        letters[item.category, item.answer] += 1
        kinds.add((item.category, " ".join(item.question.split()[:4])))
    assert letters == Counter({(c, letter): 4 for c in CATEGORIES for letter in LETTERS})
    assert {("synthetic_chart", "Which bar is the"), ("synthetic_chart", "What is the value"),
            ("synthetic_table", "Which item has the"), ("synthetic_table", "What is the value"),
            ("synthetic_compare", "Which object is larger?"), ("synthetic_compare", "Which object is on")} <= kinds
    assert any(c == "synthetic_compare" and k.startswith("Where is") for c, k in kinds)


def test_chart_pixels_agree_with_the_facts():
    for number in range(12):
        item = make_item("synthetic_chart", 0, "val", number, 64)
        pixels = item.image.load()
        tops = {}
        for color in item.facts["colors"]:
            rows = [y for y in range(64) for x in range(64) if pixels[x, y] == COLORS[color]]
            tops[color] = min(rows)
        ordered = sorted(item.facts["colors"], key=lambda c: tops[c])
        by_value = sorted(item.facts["colors"], key=lambda c: -item.facts["values"][item.facts["colors"].index(c)])
        assert ordered == by_value


def test_training_data_never_touches_the_val_split(tmp_path, monkeypatch, made):
    splits, real_make_item, real_make_sample = [], scenes.make_item, scenes.make_sample
    monkeypatch.setattr(vlm, "make_item", lambda c, s, split, *a: splits.append(split) or real_make_item(c, s, split, *a))
    monkeypatch.setattr(vlm, "make_sample", lambda s, split, *a: splits.append(split) or real_make_sample(s, split, *a))
    monkeypatch.setattr(scenes, "make_sample", lambda s, split, *a: splits.append(split) or real_make_sample(s, split, *a))
    for index in range(60):
        vlm.stage1_record(0, index, 64)
        vlm.stage2_record(0, index, 64)
    assert set(splits) == {"train"}
    splits.clear()
    list(benchmark_items(0, "dev", 14, 64))
    assert set(splits) == {"val"}

    def digests(paths):
        return {hashlib.sha256(Image.open(p).tobytes()).hexdigest() for p in paths}
    train = digests(Path(made["image_folder"]).rglob("*.png"))
    bench = {hashlib.sha256(Image.open(io.BytesIO(b)).tobytes()).hexdigest()
             for b in pq.read_table(made["vmcbench_dev_parquet"]).column("image").combine_chunks().field("bytes").to_pylist()}
    assert train and bench and not train & bench


def test_generation_is_deterministic_and_idempotent(made, tmp_path):
    again = _generate(tmp_path / "again")
    first, second = _files(Path(made["root"])), _files(Path(again["root"]))
    assert first.keys() == second.keys() and first == second
    manifest = Path(again["manifest"])
    stamp = manifest.stat().st_mtime_ns
    assert _generate(tmp_path / "again") == again and manifest.stat().st_mtime_ns == stamp
    assert vlm.vlm_data_paths(tmp_path / "again") == again
    smaller = vlm.ensure_vlm_data(tmp_path / "again", **{**SMALL, "stage1_samples": 7, "shards": False})
    assert len(_records(smaller, 1)) == 7 and not (tmp_path / "again" / "shards").exists()
    assert len(list((tmp_path / "again" / "images" / "stage1").iterdir())) == 7


def _tsv_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_benchmark_layouts_hold_the_same_rows(made):
    for split, count, first in (("dev", 56, 0), ("test", 14, 56)):
        table = pq.read_table(made[f"vmcbench_{split}_parquet"])
        assert table.schema.field("index").type == pa.int64()
        assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert features["image"] == {"_type": "Image"} and features["answer"]["dtype"] == "string"
        parquet_rows = table.to_pylist()
        tsv_rows = _tsv_rows(made[f"vmcbench_{split}_tsv"])
        assert list(tsv_rows[0]) == ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]
        assert len(parquet_rows) == len(tsv_rows) == count
        items = list(benchmark_items(0, split, count, 64))
        for row, tsv, item in zip(parquet_rows, tsv_rows, items):
            png = row["image"]["bytes"]
            assert Image.open(io.BytesIO(png)).size == (64, 64)
            assert base64.b64decode(tsv["image"]) == png
            assert {**tsv, "index": int(tsv["index"]), "image": png} == {**row, "image": png}
            assert (row["question"], tuple(row[k] for k in LETTERS), row["answer"], row["category"]) == \
                (item.question, item.options, item.answer, item.category)
            assert Image.open(io.BytesIO(png)).tobytes() == item.image.tobytes()
        assert [r["index"] for r in parquet_rows] == list(range(first, first + count))
        assert [r["category"] for r in parquet_rows[:7]] == list(CATEGORIES)
    assert items[0].number == TEST_FIRST_NUMBER  # test questions never repeat dev's


def test_shards_hold_the_same_records(made):
    for stage in (1, 2):
        records = {r["id"]: r for r in _records(made, stage)}
        shard_paths = list(braceexpand.braceexpand(made[f"stage{stage}_shards"]))
        assert len(shard_paths) == -(-len(records) // 40)
        members = {}
        for path in shard_paths:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    members[member.name] = tar.extractfile(member).read()
        assert {json.loads(members[f"{key}.json"])["id"] for key in records} == set(records)
        for key, record in records.items():
            assert json.loads(members.pop(f"{key}.json")) == record
            png = members.pop(f"{key}.png", None)
            if "image" in record:
                assert png == (Path(made["image_folder"]) / record["image"]).read_bytes()
            else:
                assert png is None
        assert not members


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="dev needs at least 7 questions"):
        vlm.main(["--out", str(tmp_path / "a"), "--dev", "3"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not VLM data"):
        vlm.main(["--out", str(tmp_path / "b"), "--stage1", "2", "--stage2", "2", "--dev", "7", "--test", "7"])
    with pytest.raises(FileNotFoundError, match="python -m data.vlm_synthetic"):
        vlm.vlm_data_paths(tmp_path / "c")
    with pytest.raises(ValueError, match="unknown category"):
        make_item("synthetic_nope", 0, "val", 0)

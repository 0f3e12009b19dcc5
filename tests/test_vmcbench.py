"""VMCBench library: both published layouts, the harnesses' parser, micro / macro aggregation, responses files."""
import base64
import json
import random

import pytest

from eval.vmcbench.data import VMCBenchDataError, data_files, load_questions, open_image
from eval.vmcbench.evaluate import read_responses
from eval.vmcbench.parse import RandomFallback, build_prompt, parse_choice
from eval.vmcbench.scoring import UNGROUPED, aggregate, canonical_category, group_of, score_responses
from eval.vmcbench.tiny import png_bytes, tiny_rows, write_parquet, write_tiny_vmcbench, write_tsv

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


# ----------------------------------------------------------------------------- data
def test_parquet_and_tsv_give_the_same_questions(tmp_path):
    rows = tiny_rows(["SEEDBench", "A-OKVQA", "TextVQA"])
    rows[1]["question"] = 'Which "word"\tis\nwritten?'  # quotes, a tab and a newline survive the TSV
    root = write_tiny_vmcbench(tmp_path / "VMCBench", rows)
    assert [p.suffix for p in data_files(root)] == [".parquet"]  # parquet preferred when both are there
    from_parquet = load_questions(root)
    from_tsv = load_questions(root / "data" / "tsv" / "VMCBench_DEV.tsv")
    assert len(from_parquet) == len(from_tsv) == 3
    for a, b in zip(from_parquet, from_tsv):
        assert (a.index, a.question, a.options, a.answer, a.category, a.image) == \
               (b.index, b.question, b.options, b.answer, b.category, b.image)
        assert open_image(a).size == (24, 16) and open_image(a).mode == "RGB"
    assert from_tsv[1].question == 'Which "word"\tis\nwritten?' and isinstance(from_tsv[0].index, int)
    (root / "data" / "dev-00000-of-00001.parquet").unlink()
    assert [p.suffix for p in data_files(root)] == [".tsv"]  # TSV only: taken
    assert [q.index for q in load_questions(root / "data")] == [0, 1, 2]  # the data/ folder itself works too


def test_tsv_image_given_as_another_rows_index(tmp_path):
    rows = tiny_rows(["GQA", "GQA"])
    path = write_tsv(tmp_path / "x.tsv", rows)
    text = path.read_text().replace(base64.b64encode(rows[1]["image"]).decode(), "0")  # VLMEvalKit's shortcut
    path.write_text(text)
    questions = load_questions(path)
    assert questions[1].image == rows[0]["image"]


def test_limit_is_evenly_spaced_and_splits_checked(tmp_path):
    root = write_tiny_vmcbench(tmp_path, tiny_rows(["MMMU"] * 10))
    assert [q.index for q in load_questions(root, limit=3)] == [0, 3, 6]
    assert [q.index for q in load_questions(root, limit=50)] == list(range(10))
    with pytest.raises(VMCBenchDataError, match="no test split found"):
        load_questions(root, split="test")
    with pytest.raises(VMCBenchDataError, match="unknown split 'val'"):
        load_questions(root, split="val")
    with pytest.raises(VMCBenchDataError, match="does not exist"):
        load_questions(tmp_path / "nowhere")


def test_bad_rows_are_named(tmp_path):
    rows = tiny_rows(["MMMU", "GQA", "AI2D"])
    rows[1]["image"] = None
    with pytest.raises(VMCBenchDataError, match=r"x\.parquet row 1: image has no bytes"):
        load_questions(write_parquet(tmp_path / "x.parquet", rows))
    rows[1]["image"] = b"not an image at all"
    with pytest.raises(VMCBenchDataError, match=r"y\.parquet row 1: image cannot be decoded"):
        load_questions(write_parquet(tmp_path / "y.parquet", rows))
    assert len(load_questions(tmp_path / "y.parquet", with_images=False)) == 3  # scoring responses: no images
    rows = tiny_rows(["MMMU", "GQA"])
    rows[0]["answer"] = "E"
    with pytest.raises(VMCBenchDataError, match=r"z\.tsv line 2 \(index 0\): answer 'E' is not one of A-D"):
        load_questions(write_tsv(tmp_path / "z.tsv", rows))
    rows = [{k: v for k, v in r.items() if k != "category"} for r in tiny_rows(["MMMU"])]
    with pytest.raises(VMCBenchDataError, match=r"w\.parquet: missing column\(s\) category"):
        load_questions(write_parquet(tmp_path / "w.parquet", rows))
    rows = tiny_rows(["MMMU", "GQA"])
    rows[1]["index"] = 0
    with pytest.raises(VMCBenchDataError, match=r"v\.tsv line 3: index 0 repeats .*v\.tsv line 2"):
        load_questions(write_tsv(tmp_path / "v.tsv", rows))


# ----------------------------------------------------------------------------- prompt and parser
def test_prompt_is_lmms_evals():
    q = load_questions_from_rows([{"question": "What colour?"}])[0]
    assert build_prompt(q) == ("Question: What colour?\nOptions:\nA. red\nB. green\nC. blue\nD. option 0\n"
                               "Answer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("response, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B.", "B"), ("Answer: B", "B"), ("B. green", "B"),
    ("(B) green", "B"), ("'B'", "B"),
    ("b", None),  # the harnesses match letters case-sensitively
    ("I don't know", None), ("", None), ("A)", None),  # `A)` is neither `(A)`, `A. ` nor a lone ` A `
    ("The colour of the square in the picture is green", "B"),  # > 5 words: an option's text
    ("green", None),  # option text only counts for responses longer than 5 words
    ("(A) looks right at first, but (C) it is", "C"), ("A or C", "C"),  # several: the last one
    ("It is not red, it is blue in this light", "C"),
    ("A. red\nB. green", "A"),  # the harness quirk: `X. ` matches tie at -1, the first letter wins
    ("(C) then B. ", "C"),
])
def test_parser_follows_the_harnesses(response, letter):
    assert parse_choice(response, OPTIONS) == letter


def test_random_fallback_is_lmms_evals_draw():
    fallback = RandomFallback(0)
    random.seed(0)  # lmms-eval: random.seed(0) once, then random.choice(all_choices) per unparsed response
    assert [fallback() for _ in range(20)] == [random.choice(["A", "B", "C", "D"]) for _ in range(20)]
    assert fallback.draws == 20


# ----------------------------------------------------------------------------- aggregation
def load_questions_from_rows(overrides, categories=None):
    from eval.vmcbench.data import Question

    rows = tiny_rows(categories or ["MMMU"] * len(overrides))
    return [Question(r["index"], o.get("question", r["question"]), {c: r[c] for c in "ABCD"},
                     o.get("answer", r["answer"]), r["category"], r["image"], f"row {i}")
            for i, (r, o) in enumerate(zip(rows, overrides))]


# category -> (questions, correct): micro and macro worked out by hand below
PLAN = {"SEEDBench": (4, 3), "MMStar": (1, 0), "aokvqa": (1, 1), "MMMU": (1, 1), "synthetic_count": (3, 0),
        "TextVQA": (2, 2), "OCRVQA": (3, 1), "AI2D": (2, 1), "PathVQA": (2, 1)}


def planned_questions():
    categories = [c for c, (n, _) in PLAN.items() for _ in range(n)]
    return load_questions_from_rows([{"answer": "B"}] * len(categories), categories)


def planned_responses(questions):
    left = {c: k for c, (_, k) in PLAN.items()}
    responses = []
    for q in questions:
        responses.append("B" if left[q.category] > 0 else "C")
        left[q.category] -= 1
    return responses


def test_micro_and_macro_by_hand():
    questions = planned_questions()
    warnings = []
    scores = aggregate(score_responses(questions, planned_responses(questions)), warnings.append)
    micro, macro = scores["groups"]["micro"], scores["groups"]["macro"]
    # General: SEEDBench 3/4, MMStar 0/1, aokvqa (= A-OKVQA) 1/1
    assert micro["General"] == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert macro["General"] == pytest.approx(100 * (0.75 + 0 + 1) / 3, abs=1e-3)
    # Reasoning: MMMU 1/1, synthetic_count 0/3
    assert micro["Reasoning"] == pytest.approx(25.0) and macro["Reasoning"] == pytest.approx(50.0)
    # OCR: TextVQA 2/2, OCRVQA 1/3
    assert micro["OCR"] == pytest.approx(60.0) and macro["OCR"] == pytest.approx(100 * (1 + 1 / 3) / 2, abs=1e-3)
    assert micro["Doc&Chart"] == macro["Doc&Chart"] == pytest.approx(50.0)
    # PathVQA is in no group: reported, warned about, counted in overall
    assert micro[UNGROUPED] == macro[UNGROUPED] == pytest.approx(50.0)
    assert len(warnings) == 1 and "PathVQA" in warnings[0]
    assert scores["overall"] == pytest.approx(100 * 10 / 19, abs=1e-3) and scores["n"] == 19
    assert scores["categories"]["SEEDBench"] == 75.0 and scores["categories"]["aokvqa"] == 100.0
    assert scores["counts"]["groups"] == {"General": 6, "Reasoning": 4, "OCR": 5, "Doc&Chart": 2, UNGROUPED: 2}
    assert scores["unparsed"] == 0


def test_category_names_and_groups():
    assert canonical_category("a_okvqa") == canonical_category("AOKVQA") == "A-OKVQA"
    assert canonical_category("TableVQA-Bench") == "TableVQABench" and canonical_category("MATH-V") == "MathVision"
    assert group_of("seedbench") == "General" and group_of("Synthetic_Word") == "OCR"
    assert group_of("synthetic_table") == "Doc&Chart" and group_of("PathVQA") == UNGROUPED


def test_unparsed_scored_wrong_or_drawn_and_counted():
    questions = load_questions_from_rows([{"answer": "A"}] * 8)
    responses = ["A", "no idea", "b", "A", "", "?", "A", "C"]
    wrong = aggregate(score_responses(questions, responses))
    assert wrong["unparsed"] == 4 and wrong["random_fallback"] == 0 and wrong["overall"] == 37.5
    rows = score_responses(questions, responses, RandomFallback(3))
    drawn = aggregate(rows)
    expected = random.Random(3)
    letters = [expected.choice(["A", "B", "C", "D"]) for _ in range(4)]
    assert [r["fallback"] for r in rows if "fallback" in r] == letters
    assert drawn["unparsed"] == 4 and drawn["random_fallback"] == 4
    assert drawn["overall"] == pytest.approx(100 * (3 + letters.count("A")) / 8)


def test_group_without_questions_is_none():
    questions = load_questions_from_rows([{"answer": "B"}], ["OCRVQA"])
    scores = aggregate(score_responses(questions, ["B"]))
    assert scores["groups"]["micro"]["General"] is None and scores["groups"]["macro"]["OCR"] == 100.0
    assert UNGROUPED not in scores["groups"]["micro"]


# ----------------------------------------------------------------------------- responses files
def test_responses_file_errors_name_the_line(tmp_path):
    questions = load_questions_from_rows([{}] * 3)
    indexes = {q.index for q in questions}
    path = tmp_path / "r.jsonl"
    path.write_text('{"index": 0, "response": "A"}\n{"index": 1, "response": "B"\n')
    with pytest.raises(VMCBenchDataError, match=r"r\.jsonl line 2: not valid JSON"):
        read_responses(path, questions, indexes)
    path.write_text('{"index": 0, "response": "A"}\n\n{"index": "1", "response": "B"}\n')
    with pytest.raises(VMCBenchDataError, match=r"no response for index 2 \(1 of 3 questions\)"):
        read_responses(path, questions, indexes)
    path.write_text('{"index": 0, "response": "A"}\n{"index": 7, "response": "B"}\n')
    with pytest.raises(VMCBenchDataError, match=r"line 2: index 7 is not a question of this split"):
        read_responses(path, questions, indexes)
    path.write_text('{"index": 0, "response": "A"}\n{"index": 0, "response": "B"}\n')
    with pytest.raises(VMCBenchDataError, match=r"line 2: a second response for index 0"):
        read_responses(path, questions, indexes)
    path.write_text('{"index": 0, "prediction": "A"}\n')
    with pytest.raises(VMCBenchDataError, match=r"line 1: expected an object with \"index\" and \"response\""):
        read_responses(path, questions, indexes)
    path.write_text("".join(json.dumps({"index": i, "response": r}) + "\n" for i, r in [(2, "C"), (0, "A"), (1, None)]))
    assert read_responses(path, questions, indexes) == ["A", "", "C"]  # dataset order; null -> ""


def test_png_helper_round_trips():
    assert png_bytes((1, 2, 3))[:8] == b"\x89PNG\r\n\x1a\n"

"""zoocli.evaluation: readers, metrics, record store, shards, summary, the shipped sample eval set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from zoocli.errors import UsageError, ZooError
from zoocli.evaluation import (
    MEAN, SAMPLE_EVAL, RecordWriter, Sample, dataset_name, done_keys, extract_choice,
    extract_yes_no, find_shards, load_answers, load_samples, make_record, merge_shards,
    normalize_answer, read_records, record_key, score_one, score_predictions, shard, shard_path,
    shard_paths, summarize, vqa_accuracy, yes_no_metrics,
)

REPO = Path(__file__).resolve().parent.parent

# Real lines, copied from /work/shared/eval_samples (see its SOURCES.md).
POPE_LINES = [
    '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}',
    '{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a car in the image?", "label": "no"}',
    '{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a person in the image?", "label": "yes"}',
    '{"question_id": 4, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a sandwich in the image?", "label": "no"}',
]
GQA_LINES = [
    '{"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?\\nAnswer the question using a single word or phrase.", "category": "default"}',
    '{"question_id": "201640614", "image": "n235859.jpg", "text": "Who is wearing the dress?\\nAnswer the question using a single word or phrase.", "category": "default"}',
    '{"question_id": "202225914", "image": "n336443.jpg", "text": "Does the utensil on top of the table look clean and black?\\nAnswer the question using a single word or phrase.", "category": "default"}',
]
_OCR = ("Reference OCR token: IGNET, N, MORANGIE, MORANGIE, MORANGIE, CHLANDS, ISLAY, OWMOR, OR, SINGL, "
        "MALT, WHISKY, SINGLE, MALT, HISKY, SCOTCH, WHITS, LASANTA, NON, CHILL-F, MATURED, RARE, SHERRY, "
        "CASKS, BatckK, Reliasen, CAKTYPE, STFILLBOURSON, BATCHNS, TOUE, CISTILLER, 55.6%ac, LONGHO, ATOL, "
        "BLAY, SCORLAND, AGED, 10")
_TAIL = "Answer the question using a single word or phrase."
TEXTVQA_LINES = [
    '{"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": "What is the brand of this camera?\\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire, digitat\\nAnswer the question using a single word or phrase.", "category": "default"}',
    json.dumps({"question_id": "831bcec304a17054", "image": "831bcec304a17054.jpg",
                "text": f"What brand liquor is on the right?\n{_OCR}\n{_TAIL}", "category": "default"}),
    json.dumps({"question_id": "831bcec304a17054", "image": "831bcec304a17054.jpg",
                "text": f"How long has the drink on the right been aged?\n{_OCR}\n{_TAIL}", "category": "default"}),
]


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jl(objs) -> list[str]:
    return [json.dumps(o) for o in objs]


# --------------------------------------------------------------------------- readers


def test_pope_reader(tmp_path):
    s = load_samples(write(tmp_path / "pope.jsonl", POPE_LINES))
    assert [x.id for x in s] == ["1", "2", "3", "4"]
    assert s[0].image == "COCO_val2014_000000310196.jpg"
    assert s[0].question == "Is there a snowboard in the image?"
    assert [x.answers for x in s] == [["yes"], ["no"], ["yes"], ["no"]]
    assert all(x.kind == "yesno" and x.source_id == i + 1 for i, x in enumerate(s))


def test_shared_real_files_load_if_present():
    shared = Path("/work/shared/eval_samples")
    if not shared.is_dir():
        pytest.skip("no shared eval samples here")
    assert len(load_samples(shared / "pope_coco_random.head60.jsonl")) == 60
    tv = load_samples(shared / "textvqa_llava_val_v051_ocr.head50.jsonl")
    assert len({x.id for x in tv}) == 50 and all(x.answers is None for x in tv)
    assert len(load_samples(shared / "gqa_llava_testdev_balanced.head50.jsonl")) == 50


def test_llava_questions_with_answers_file(tmp_path):
    q = write(tmp_path / "gqa.jsonl", GQA_LINES)
    no_answers = load_samples(q)
    assert all(x.answers is None and x.kind == "vqa" for x in no_answers)
    assert no_answers[0].category == "default"
    assert no_answers[0].question.startswith("Is it overcast?\nAnswer")
    a = write(tmp_path / "ans.jsonl", jl([
        {"question_id": "202225914", "answer": "No"},   # any order
        {"question_id": "201307251", "answer": "yes"},
        {"question_id": "201640614", "answers": ["woman", "woman", "lady"]},
        {"question_id": "999", "answer": "unused"},
    ]))
    s = load_samples(q, answers=a)
    assert [x.answers for x in s] == [["yes"], ["woman", "woman", "lady"], ["No"]]
    assert [x.kind for x in s] == ["yesno", "vqa", "yesno"]
    assert [x.soft for x in s] == [False, True, False]


def test_llava_pope_variant_with_pope_label_file(tmp_path):
    q = write(tmp_path / "q.jsonl", jl([
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a snowboard in the image?\nAnswer the question using a single word or phrase.",
         "category": "adversarial"}]))
    s = load_samples(q, answers=write(tmp_path / "labels.jsonl", POPE_LINES))
    assert s[0].answers == ["yes"] and s[0].kind == "yesno"


def test_textvqa_repeated_ids_match_by_question(tmp_path):
    q = write(tmp_path / "textvqa.jsonl", TEXTVQA_LINES)
    s0 = load_samples(q)
    assert [x.id for x in s0] == ["003a8ae2ef43b901", "831bcec304a17054#1", "831bcec304a17054#2"]
    assert s0[1].source_id == "831bcec304a17054"
    ten_aged = ["10 years"] * 6 + ["10"] * 4
    a = write(tmp_path / "ans.jsonl", jl([
        {"question_id": "831bcec304a17054", "question": "how long has the drink on the right been aged?",
         "answers": ten_aged},
        {"question_id": "831bcec304a17054", "question": "What brand liquor is on the right?",
         "answers": ["bowmore"] * 10},
        {"question_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 10},
    ]))
    s = load_samples(q, answers=a)
    assert s[0].answers == ["dakota"] * 10
    assert s[1].answers == ["bowmore"] * 10
    assert s[2].answers == ten_aged and s[2].soft
    # without the question text the match is refused, naming the line and the field
    bad = write(tmp_path / "bad.jsonl", jl([{"question_id": "831bcec304a17054", "answers": ["x"]}]))
    with pytest.raises(ZooError, match=r"bad\.jsonl, line 1: .*'question'"):
        load_samples(q, answers=bad)


def test_textvqa_official_json_answers(tmp_path):
    q = write(tmp_path / "textvqa.jsonl", TEXTVQA_LINES)
    data = {"dataset_name": "textvqa", "data": [
        {"image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?", "answers": ["dakota"] * 10},
        {"image_id": "831bcec304a17054", "question": "what brand liquor is on the right?", "answers": ["bowmore"] * 10},
        {"image_id": "831bcec304a17054", "question": "how long has the drink on the right been aged?",
         "answers": ["10 years"] * 10},
    ]}
    a = tmp_path / "TextVQA_0.5.1_val.json"
    for text in (json.dumps(data), json.dumps(data, indent=1)):  # the official file is one line
        a.write_text(text)
        s = load_samples(q, answers=a)
        assert [x.answers[0] for x in s] == ["dakota", "bowmore", "10 years"]
        assert s[0].soft


def test_gqa_official_json_answers(tmp_path):
    q = write(tmp_path / "gqa.jsonl", GQA_LINES)
    a = tmp_path / "testdev_balanced_questions.json"
    a.write_text(json.dumps({k: {"question": "?", "answer": v, "fullAnswer": "..."} for k, v in
                             [("201307251", "yes"), ("201640614", "woman"), ("202225914", "no")]}, indent=1))
    assert [x.answers for x in load_samples(q, answers=a)] == [["yes"], ["woman"], ["no"]]


def test_missing_answer_names_question_line(tmp_path):
    q = write(tmp_path / "gqa.jsonl", GQA_LINES)
    a = write(tmp_path / "ans.jsonl", jl([{"question_id": "201307251", "answer": "yes"}]))
    with pytest.raises(ZooError, match=r"gqa\.jsonl, line 2: no answer with question_id '201640614'"):
        load_samples(q, answers=a)


def test_plain_reader_kinds(tmp_path):
    p = write(tmp_path / "plain.jsonl", jl([
        {"image": "a.jpg", "question": "Is it red?", "answer": "Yes"},
        {"image": "a.jpg", "question": "What colour?", "answer": ["red", "crimson"]},
        {"image": "a.jpg", "question": "What is it?", "answers": ["cup"] * 7 + ["mug"] * 3},
        {"image": "a.jpg", "question": "Which?", "answer": "(B)", "choices": ["cat", "cup", "dog"], "id": "mc1"},
        {"image": "a.jpg", "question": "Which?", "answer": "dog", "choices": ["cat", "cup", "dog"]},
    ]))
    s = load_samples(p)
    assert [x.kind for x in s] == ["yesno", "vqa", "vqa", "mc", "mc"]
    assert [x.id for x in s] == ["1", "2", "3", "mc1", "5"]
    assert s[1].answers == ["red", "crimson"] and not s[1].soft
    assert s[2].soft
    assert s[3].answers == ["B"] and s[4].answers == ["C"] and s[4].choices == ["cat", "cup", "dog"]


def test_image_root_joins_and_checks(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    p = write(tmp_path / "plain.jsonl", jl([
        {"image": "a.jpg", "question": "Q?", "answer": "yes"},
        {"image": "b.jpg", "question": "Q?", "answer": "no"},
    ]))
    with pytest.raises(ZooError, match=r"plain\.jsonl, line 2: field 'image': no such image file .*b\.jpg"):
        load_samples(p, image_root=tmp_path / "img")
    s = load_samples(write(tmp_path / "ok.jsonl", jl([{"image": "a.jpg", "question": "Q?", "answer": "yes"}])),
                     image_root=tmp_path / "img")
    assert s[0].image == str(tmp_path / "img" / "a.jpg")


@pytest.mark.parametrize("lines, pattern", [
    ([POPE_LINES[0], '{"question_id": 2, "image": "x.jpg", "text": "Q?"'],
     r"line 2: not valid JSON"),
    ([POPE_LINES[0], '{"question_id": 2, "image": "x.jpg", "text": "Q?"}'],
     r"line 2: missing field 'label'"),
    ([POPE_LINES[0], "", '{"question_id": 3, "image": "x.jpg", "text": "Q?", "label": "maybe"}'],
     r"line 3: field 'label' must be \"yes\" or \"no\""),
    ([POPE_LINES[0], '{"question_id": 2, "image": 7, "text": "Q?", "label": "no"}'],
     r"line 2: field 'image' must be a non-empty string"),
    ([GQA_LINES[0], '{"question_id": true, "image": "x.jpg", "text": "Q?"}'],
     r"line 2: field 'question_id' must be a string or an integer"),
    (['{"image": "a.jpg", "question": "Q?"}'], r"line 1: missing field 'answer'"),
    (['{"image": "a.jpg", "question": "Q?", "answer": []}'], r"line 1: field 'answer' must be"),
    (['{"image": "a.jpg", "question": "Q?", "answer": "E", "choices": ["x", "y"]}'],
     r"line 1: field 'answer': \"E\" is neither a letter A-B nor one of the choices"),
    (['{"image": "a.jpg", "question": "Q?", "answer": "A", "choices": "xy"}'], r"line 1: field 'choices'"),
    (['{"picture": "a.jpg", "prompt": "Q?"}'], r"line 1: cannot tell the format from the keys picture, prompt"),
    (['[1, 2]'], r"line 1: expected a JSON object"),
])
def test_reader_errors_name_file_line_field(tmp_path, lines, pattern):
    p = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ZooError, match=r"bad\.jsonl, " + pattern if "line" in pattern else pattern):
        load_samples(p)


def test_reader_file_level_errors(tmp_path):
    with pytest.raises(ZooError, match="no such file"):
        load_samples(tmp_path / "nope.jsonl")
    with pytest.raises(ZooError, match="no questions"):
        load_samples(write(tmp_path / "empty.jsonl", ["", " "]))
    with pytest.raises(ZooError, match="answers inline"):
        load_samples(write(tmp_path / "pope.jsonl", POPE_LINES), answers=tmp_path / "x.jsonl")
    with pytest.raises(ZooError, match=r"ans\.jsonl, line 1: missing field 'answer'"):
        load_samples(write(tmp_path / "g.jsonl", GQA_LINES),
                     answers=write(tmp_path / "ans.jsonl", ['{"question_id": "201307251"}']))
    with pytest.raises(ZooError, match="image folder .* does not exist"):
        load_samples(write(tmp_path / "p2.jsonl", POPE_LINES), image_root=tmp_path / "missing")


def test_one_line_jsonl_answers_file(tmp_path):
    q = write(tmp_path / "gqa.jsonl", GQA_LINES[:1])
    a = write(tmp_path / "a.jsonl", ['{"question_id": "201307251", "answer": "yes"}'])
    assert load_samples(q, answers=a)[0].answers == ["yes"]


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    p = tmp_path / "plain.jsonl"
    p.write_text(json.dumps({"image": "a.jpg", "question": "Q\u2028?", "answer": "x"}, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    assert load_samples(p)[0].question == "Q\u2028?"


def test_load_answers_layouts(tmp_path):
    a = load_answers(write(tmp_path / "a.jsonl", jl([
        {"question_id": 1, "label": "yes", "text": "Is there a dog?"},
        {"question_id": 2, "answers": [{"answer": "two", "answer_confidence": "yes"}, {"answer": "2"}]},
    ])))
    assert a[0].answers == ["yes"] and a[0].question == "is there a dog?"
    assert a[1].answers == ["two", "2"] and a[1].soft


def test_dataset_name():
    assert dataset_name("/x/pope_coco_random.head60.jsonl") == "pope_coco_random.head60"


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("raw, norm", [
    ("Yes.", "yes"),
    ("The answer is two!", "answer is 2"),
    ("A Red, white and blue", "red white and blue"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("5.", "5"),
    ("off-white", "off white"),
    ("dont know", "don't know"),
    ("an Apple", "apple"),
    ("ten", "10"),
    ("none", "0"),
    ("  two\tcats\n", "2 cats"),
    ("(hello)", "hello"),
    ("yes, it is", "yes it is"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_alternatives_and_soft():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("the cat", ["dog", "cat"]) == 1.0
    assert vqa_accuracy("cats", ["cat"]) == 0.0
    ten = ["cup"] * 3 + ["mug"] * 7
    assert vqa_accuracy("cup", ten, soft=True) == pytest.approx(0.9)  # official leave-one-out
    assert vqa_accuracy("cup", ten, soft=True, leave_one_out=False) == 1.0
    assert vqa_accuracy("mug", ten, soft=True) == 1.0
    assert vqa_accuracy("cup", ["cup"] + ["mug"] * 9, soft=True) == pytest.approx(0.3)
    assert vqa_accuracy("cup", ["cup"] * 2 + ["mug"] * 8, soft=True) == pytest.approx(0.6)
    assert vqa_accuracy("cup", ["cup"] * 2 + ["mug"] * 8, soft=True, leave_one_out=False) == pytest.approx(2 / 3)
    assert vqa_accuracy("bowl", ten, soft=True) == 0.0


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("no.", "no"), ("NO, there is not.", "no"), ("Yes, there is no dog", "yes"),
    ("There is no snowboard.", "no"), ("I cannot tell", None), ("nothing here", None), ("", None),
])
def test_extract_yes_no(text, want):
    assert extract_yes_no(text) == want


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", "yes", "no", "yes", "no", "no", "no", "no", None]
    m = yes_no_metrics(preds, labels)
    # TP 3, FN 1, FP 1, TN 4, one unreadable negative
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unreadable"]) == (3, 1, 1, 4, 1)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["yes_ratio"] == pytest.approx(0.4)
    zero = yes_no_metrics(["no", "no"], ["yes", "no"])
    assert zero["precision"] == 0.0 and zero["f1"] == 0.0 and not math.isnan(zero["recall"])


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B. Paris", "B"), ("(C) Rome", "C"),
    ("B) Paris", "B"), ("The answer is B.", "B"), ("Answer: (A)", "A"), ("I choose option C", "C"),
    ("Paris", "B"), ("It is Paris, the capital.", "B"), ("the answer is a city", None),
    ("E", None), ("London or Paris", None), ("I don't know", None),
])
def test_extract_choice(text, want):
    assert extract_choice(text, ["London", "Paris", "Rome"]) == want


def test_extract_choice_prefers_longer_contained_choice():
    assert extract_choice("dark red", ["red", "dark red", "blue"]) == "B"


def test_score_predictions_mixed():
    samples = [
        Sample("1", "a.jpg", "Is it a cat?", ["yes"], "yesno"),
        Sample("2", "a.jpg", "Is it a dog?", ["no"], "yesno"),
        Sample("3", "a.jpg", "What is it?", ["cat", "kitten"], "vqa"),
        Sample("4", "a.jpg", "Which?", ["B"], "mc", choices=["dog", "cat"]),
        Sample("5", "a.jpg", "What?", ["cup"] * 3 + ["mug"] * 7, "vqa", soft=True),
    ]
    preds = {"1": "Yes, it is.", "2": "Yes", "3": "A kitten.", "4": "The answer is (B)", "5": "cup"}
    r = score_predictions(samples, preds)
    assert r["n"] == 5
    assert r["score"] == pytest.approx((1 + 0 + 1 + 1 + 0.9) / 5)
    assert r["by_kind"]["yesno"] == {"n": 2, "score": 0.5}
    assert r["yesno"]["tp"] == 1 and r["yesno"]["fp"] == 1 and r["yesno"]["f1"] == pytest.approx(2 / 3)
    assert score_predictions(samples, [preds[s.id] for s in samples]) == r
    with pytest.raises(ZooError, match="1 of 5 samples have no prediction"):
        score_predictions(samples, {k: v for k, v in preds.items() if k != "3"})
    with pytest.raises(ZooError, match="no reference answers"):
        score_one(Sample("9", "a.jpg", "Q", None, "vqa"), "x")


# --------------------------------------------------------------------------- store, resume, shards


def rec(dataset, sid, method, budget, score, kind="vqa", **kw):
    r = {"dataset": dataset, "id": sid, "method": method, "budget": budget, "kind": kind,
         "score": score, "prediction": "p", "answers": ["a"]}
    r.update(kw)
    return r


def test_make_record_and_writer_resume(tmp_path):
    s = Sample("7", "a.jpg", "Is it?", ["yes"], "yesno")
    r = make_record(s, "pope", "zoo", 64.0, "Yes.", kept_tokens=64, timings_ms={"total": 1.5})
    assert r["score"] == 1.0 and r["correct"] is True and r["extracted"] == "yes" and r["budget"] == 64
    path = tmp_path / "out" / "run.jsonl"
    with RecordWriter(path) as w:
        w.write(r)
        w.write(make_record(s, "pope", "none", None, "No"))
    assert path.read_text().count("\n") == 2  # flushed line by line
    keys = done_keys(path)
    assert keys == {("pope", "7", "zoo", 64), ("pope", "7", "none", None)}
    # a rerun skips what is done
    todo = [(m, b) for m, b in [("none", None), ("zoo", 64), ("zoo", 128)] if ("pope", s.id, m, b) not in keys]
    assert todo == [("zoo", 128)]
    assert done_keys(tmp_path / "absent.jsonl") == set()
    assert record_key({"dataset": "d", "id": 5, "method": "m", "budget": 32.0}) == ("d", "5", "m", 32)


def test_truncated_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "run.jsonl"
    good = json.dumps(rec("pope", "1", "zoo", 64, 1.0))
    path.write_text(good + "\n" + json.dumps(rec("pope", "2", "zoo", 64, 0.0))[:25])  # crash mid-write
    assert done_keys(path) == {("pope", "1", "zoo", 64)}
    assert [r["id"] for r in read_records(path)] == ["1"]
    with RecordWriter(path) as w:  # reopening drops the torn line before appending
        w.write(rec("pope", "2", "zoo", 64, 0.0))
    assert [r["id"] for r in read_records(path)] == ["1", "2"]
    assert path.read_text().endswith("}\n")
    # a whole record that only lost its newline is kept
    path2 = tmp_path / "run2.jsonl"
    path2.write_text(good)
    with RecordWriter(path2) as w:
        w.write(rec("pope", "3", "zoo", 64, 1.0))
    assert [r["id"] for r in read_records(path2)] == ["1", "3"]


def test_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(rec("d", "1", "m", 1, 1.0)) + "\n{oops\n" + json.dumps(rec("d", "2", "m", 1, 1.0)) + "\n")
    with pytest.raises(ZooError, match=r"run\.jsonl, line 2: not a valid JSON record"):
        done_keys(path)
    path.write_text('{"dataset": "d", "id": "1", "method": "m"}\n')
    with pytest.raises(ZooError, match=r"line 1: record lacks the field 'budget'"):
        list(read_records(path))


@pytest.mark.parametrize("n, world", [(0, 1), (1, 3), (10, 1), (10, 3), (7, 7), (5, 8)])
def test_shard_disjoint_and_covering(n, world):
    items = [f"s{i}" for i in range(n)]
    parts = [shard(items, r, world) for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert parts == [shard(items, r, world) for r in range(world)]  # deterministic
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_bad_arguments():
    with pytest.raises(UsageError, match="rank"):
        shard([1, 2], 2, 2)
    with pytest.raises(UsageError, match="world size"):
        shard([1, 2], 0, 0)


def test_shard_paths_and_find(tmp_path):
    base = tmp_path / "run.jsonl"
    assert shard_path(base, 0).name == "run.rank0.jsonl"
    assert [p.name for p in shard_paths(base, 3)] == ["run.rank0.jsonl", "run.rank1.jsonl", "run.rank2.jsonl"]
    assert shard_path(tmp_path / "run", 1).name == "run.rank1.jsonl"
    for r in (10, 2, 0):
        shard_path(base, r).write_text("")
    (tmp_path / "other.rank1.jsonl").write_text("")
    assert [p.name for p in find_shards(base)] == ["run.rank0.jsonl", "run.rank2.jsonl", "run.rank10.jsonl"]


def test_merge_is_deterministic(tmp_path):
    recs = [rec("textvqa", str(i), m, b, i % 2) for i in range(6) for m, b in [("none", None), ("zoo", 64)]]
    base = tmp_path / "run.jsonl"
    for r in range(3):
        with RecordWriter(shard_path(base, r)) as w:
            for x in shard(recs, r, 3)[::-1]:
                w.write(x)
    out1, out2 = tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"
    paths = find_shards(base)
    assert merge_shards(paths, out1) == 12
    assert merge_shards(paths[::-1], out2) == 12
    assert out1.read_bytes() == out2.read_bytes()
    merged = list(read_records(out1))
    assert [(r["method"], r["id"]) for r in merged[:3]] == [("none", "0"), ("none", "1"), ("none", "2")]
    # a key in two shards is kept once (first by rank)
    with RecordWriter(shard_path(base, 2)) as w:
        w.write(rec("textvqa", "0", "none", None, 0.5))
    assert merge_shards(find_shards(base), out1) == 12
    assert [r["score"] for r in read_records(out1) if r["id"] == "0" and r["method"] == "none"] == [0]


# --------------------------------------------------------------------------- summary


def test_summary_retention_and_mean():
    recs = []
    for i in range(4):  # dataset A: baseline 0.75, zoo@64 0.5, zoo@128 0.75
        recs.append(rec("A", i, "none", None, [1, 1, 1, 0][i]))
        recs.append(rec("A", i, "zoo", 64, [1, 0, 1, 0][i]))
        recs.append(rec("A", i, "zoo", 128, [1, 1, 0, 1][i]))
    for i in range(2):  # dataset B: baseline 0.5, zoo@64 0.5, zoo@128 0.25 (soft)
        recs.append(rec("B", i, "none", None, [1, 0][i]))
        recs.append(rec("B", i, "zoo", 64, [0, 1][i]))
        recs.append(rec("B", i, "zoo", 128, [0.5, 0][i]))
    rows = summarize(recs)
    table = {(r["method"], r["budget"], r["dataset"]): r for r in rows}
    assert [(r["method"], r["budget"], r["dataset"]) for r in rows][:3] == [
        ("none", None, "A"), ("none", None, "B"), ("none", None, MEAN)]
    assert table[("none", None, "A")]["retention"] == 1.0
    assert table[("zoo", 64, "A")]["score"] == 0.5
    assert table[("zoo", 64, "A")]["retention"] == pytest.approx(2 / 3)
    assert table[("zoo", 64, "B")]["retention"] == pytest.approx(1.0)
    m = table[("zoo", 64, MEAN)]
    assert m["score"] == pytest.approx(0.5) and m["retention"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["datasets"] == 2 and m["n"] == 6
    assert table[("zoo", 128, MEAN)]["retention"] == pytest.approx((1 + 0.5) / 2)
    assert rows.index(table[("zoo", 64, MEAN)]) < rows.index(table[("zoo", 128, "A")])


def test_summary_orders_percent_budgets_by_value():
    """Budgets given as a share of the visual tokens sort by value (5% < 11% < 25% < 50%), after
    token counts; they once sorted as strings (11%, 25%, 5%, 50%)."""
    recs = [rec("A", 0, "none", None, 1)]
    for b in ["50%", "5%", "25%", "11%", "2.5%", 64, "128"]:
        recs.append(rec("A", 0, "zoo", b, 1))
    order = [r["budget"] for r in summarize(recs) if r["method"] == "zoo" and r["dataset"] == "A"]
    assert order == [64, "128", "2.5%", "5%", "11%", "25%", "50%"]


def test_summary_zero_baseline_is_none_not_nan():
    recs = [rec("A", 0, "none", None, 0.0), rec("A", 0, "zoo", 64, 1.0),
            rec("B", 0, "none", None, 1.0), rec("B", 0, "zoo", 64, 1.0),
            rec("C", 0, "zoo", 64, 1.0)]  # no baseline for C
    table = {(r["method"], r["dataset"]): r for r in summarize(recs)}
    assert table[("zoo", "A")]["retention"] is None
    assert table[("zoo", "C")]["retention"] is None
    assert table[("zoo", "B")]["retention"] == 1.0
    assert table[("zoo", MEAN)]["retention"] is None
    assert table[("none", "A")]["retention"] is None
    json.dumps(summarize(recs), allow_nan=False)  # no NaN anywhere


def test_summary_f1_metric_and_last_duplicate_wins():
    labels = ["yes", "yes", "no", "no"]
    base = [rec("pope", i, "none", None, 1.0, kind="yesno", answers=[y], extracted=y) for i, y in enumerate(labels)]
    zoo = [rec("pope", i, "zoo", 64, float(p == y), kind="yesno", answers=[y], extracted=p)
           for i, (p, y) in enumerate(zip(["yes", "no", "yes", "no"], labels))]
    rows = summarize(base + zoo, metric={"pope": "f1"})
    table = {(r["method"], r["dataset"]): r for r in rows}
    assert table[("zoo", "pope")]["score"] == pytest.approx(0.5)  # P 0.5, R 0.5
    assert table[("zoo", "pope")]["metric"] == "f1"
    fixed = rec("pope", 1, "zoo", 64, 1.0, kind="yesno", answers=["yes"], extracted="yes")
    table = {(r["method"], r["dataset"]): r for r in summarize(base + zoo + [fixed])}
    assert table[("zoo", "pope")]["score"] == pytest.approx(0.75)  # last record for the key wins


# --------------------------------------------------------------------------- the shipped sample eval set


def test_sample_eval_set_loads_and_images_exist():
    images = REPO / "sample_images"
    samples = load_samples(SAMPLE_EVAL, image_root=images)
    assert len(samples) >= 20 and len({s.id for s in samples}) == len(samples)
    assert all(Path(s.image).is_file() for s in samples)
    shipped = {p.name for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    per_image = {name: sum(Path(s.image).name == name for s in samples) for name in shipped}
    assert all(2 <= k <= 4 for k in per_image.values()), per_image
    yn = [s.answers[0] for s in samples if s.kind == "yesno"]
    assert "yes" in yn and "no" in yn
    assert any(s.kind == "vqa" for s in samples)
    # raw file: plain format, image names relative to sample_images/
    for line in SAMPLE_EVAL.read_text().splitlines():
        obj = json.loads(line)
        assert set(obj) <= {"id", "image", "question", "answer"} and "/" not in obj["image"]
    # the reference answers score perfectly
    r = score_predictions(samples, {s.id: s.answers[0] for s in samples})
    assert r["score"] == 1.0

"""Issue 11: data files point only inside --image-root, and every hostile data / records file is a
one-line ZooError naming the file (and line), never a traceback or a hang."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoocli.bench import done_keys as bench_done_keys
from zoocli.errors import ZooError
from zoocli.evaluation import load_answers, load_samples, read_records
from zoocli.outfile import BENCH_KEYS, check_jsonl
from zoocli.evaluation.store import KEY_FIELDS


def jl(path, objs_or_lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in objs_or_lines) + "\n")
    return path


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "img" / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(b"x")
    return tmp_path / "img"


def row(image):
    return {"image": image, "question": "Q?", "answer": "yes"}


@pytest.mark.parametrize("image", ["../outside/secret.jpg", "sub/../../outside/secret.jpg", "ABS", "link/secret.jpg"])
def test_image_outside_root_is_refused_with_line(tmp_path, root, image):
    (root / "link").symlink_to(tmp_path / "outside")
    if image == "ABS":
        image = str(tmp_path / "outside" / "secret.jpg")
    p = jl(tmp_path / "q.jsonl", [row("sub/a.jpg"), row(image)])
    with pytest.raises(ZooError, match=r"q\.jsonl, line 2: field 'image': .* is outside the image folder .*img"):
        load_samples(p, image_root=root)
    s = load_samples(p, image_root=root, allow_outside_root=True)  # the deliberate switch
    assert os.path.realpath(s[1].image) == str(tmp_path / "outside" / "secret.jpg")


def test_inside_root_still_works_including_links_inside(tmp_path, root):
    (root / "alias").symlink_to(root / "sub")
    s = load_samples(jl(tmp_path / "q.jsonl", [row("sub/a.jpg"), row("alias/a.jpg"), row("./sub/../sub/a.jpg")]),
                     image_root=root)
    assert [x.image for x in s] == [str(root / "sub/a.jpg"), str(root / "alias/a.jpg"),
                                   str(root / "./sub/../sub/a.jpg")]


def test_image_that_is_a_fifo_is_not_an_image_file(tmp_path, root):
    os.mkfifo(root / "f.jpg")
    with pytest.raises(ZooError, match="line 1: field 'image': no such image file"):
        load_samples(jl(tmp_path / "q.jsonl", [row("f.jpg")]), image_root=root)


HOSTILE_LINES = {
    "deep": ("[" * 100_000 + "]" * 100_000, r"line 1: not valid JSON \(nested too deeply\)"),
    "deep_obj": ('{"a":' * 100_000 + "1" + "}" * 100_000, r"line 1: not valid JSON \(nested too deeply\)"),
    "digits": ('{"question_id": ' + "7" * 5000 + ', "image": "a.jpg", "text": "Q?", "label": "yes"}',
               r"line 1: not valid JSON \(Exceeds the limit"),
    "long_name": (json.dumps(row("x" * 10_000 + ".jpg")), r"line 1: field 'image': no such image file"),
    "nul": (json.dumps(row("a\u0000.jpg")), r"line 1: field 'image' contains a NUL"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_hostile_line_is_one_line(tmp_path, root, name):
    line, pattern = HOSTILE_LINES[name]
    p = tmp_path / "q.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(ZooError, match=r"q\.jsonl, " + pattern) as e:
        load_samples(p, image_root=root)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


def test_digit_string_ids_of_any_length(tmp_path, root):
    from zoocli.evaluation import make_record, merge_shards

    s = load_samples(jl(tmp_path / "q.jsonl", [dict(row("sub/a.jpg"), id="7" * 5000),
                                               dict(row("sub/a.jpg"), id="12")]), image_root=root)
    shard = tmp_path / "r.rank0.jsonl"
    shard.write_text("".join(json.dumps(make_record(x, "d", "none", None, "yes")) + "\n" for x in s))
    assert merge_shards([shard], tmp_path / "r.jsonl") == 2  # sorting never converts 5000 digits


def test_fifo_data_file_is_refused(tmp_path):
    p = tmp_path / "q.jsonl"
    os.mkfifo(p)
    with pytest.raises(ZooError, match="not a regular file"):
        load_samples(p)
    with pytest.raises(ZooError, match="not a regular file"):
        load_answers(p)


# --------------------------------------------------------------------------- property tests

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(
        ["image", "question", "text", "label", "answer", "answers", "question_id", "id", "choices",
         "category", "data", "dataset", "method", "budget", "key", "x"]), kids, max_size=6),
    max_leaves=30)


def _nested(depth, kind):
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "0" + "}" * depth)


_documents = st.one_of(
    st.binary(max_size=400),
    st.lists(_json, max_size=4).map(lambda xs: "\n".join(json.dumps(x) for x in xs).encode()),
    st.tuples(st.integers(1, 20_000), st.sampled_from(["list", "obj"])).map(lambda t: _nested(*t).encode()),
)


def _readers(p, root):
    return [lambda: load_samples(p, image_root=root), lambda: load_samples(p), lambda: load_answers(p),
            lambda: list(read_records(p)), lambda: bench_done_keys(p),
            lambda: check_jsonl(p, KEY_FIELDS), lambda: check_jsonl(p, BENCH_KEYS)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_documents)
def test_every_reader_parses_or_says_one_line(tmp_path, doc):
    p = tmp_path / "hostile.jsonl"
    p.write_bytes(doc)
    (tmp_path / "img").mkdir(exist_ok=True)
    for read in _readers(p, tmp_path / "img"):
        try:
            read()
        except ZooError as e:
            msg = str(e)
            assert msg and "\n" not in msg and "Traceback" not in msg

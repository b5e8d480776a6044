"""`zoo eval`: batched inference equals batch size 1, resume, crash safety, torchrun data
parallelism, the CLI's JSON and errors (offline tiny models, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoocli.eval_runner import Dataset, EvalSpec, run_eval
from zoocli.evaluation import RecordWriter, load_samples, read_records, summarize
from zoocli.images import load_image
from zoocli.pipeline import encode_image, select_tokens
from cli_helpers import run

pytestmark = pytest.mark.usefixtures("offline_models", "one_thread")

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "sample_images"
VOLATILE = ("timings_ms", "batch_rows")  # differ between runs / batchings, nothing else may

PLAIN = [
    {"id": "a", "image": "cat_chelsea.png", "question": "What animal is this?", "answer": "cat"},
    {"id": "b", "image": "coffee_cup.jpg", "question": "Is there a cup?", "answer": "yes"},
    {"id": "c", "image": "receipt_cord.jpg", "question": "What is written at the top of the receipt?",
     "answer": ["cord", "the cord"]},
    {"id": "d", "image": "navy_jet_clouds.jpg", "question": "Is there a boat?", "answer": "no"},
    {"id": "e", "image": "laptop_coding.jpg", "question": "How many laptops?", "answer": "1"},
]
POPE = [
    {"question_id": 1, "image": "cat_chelsea.png", "text": "Is there a cat in the image?", "label": "yes"},
    {"question_id": 2, "image": "cat_chelsea.png", "text": "Is there a car in the image?", "label": "no"},
    {"question_id": 3, "image": "coffee_cup.jpg", "text": "Is there a cup in the image?", "label": "yes"},
]
FAST = ["--max-new-tokens", "3", "--estimator", "fd", "--m", "4", "--model", "tiny-llava"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def stable(path: Path) -> dict:
    out = {}
    for r in read_records(path):
        out[(r["dataset"], r["id"], r["method"], r["budget"])] = {k: v for k, v in r.items() if k not in VOLATILE}
    return out


# ------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen"])
def test_batch_predictions_equal_batch_size_one(fixture, request):
    """Rows with different kept counts (all, 3, 5, 9, 1), left-padded into one batch, give exactly
    the tokens each gets alone through the single-row path."""
    adapter = request.getfixturevalue(fixture)
    names = ["cat_chelsea.png", "coffee_cup.jpg", "receipt_cord.jpg", "navy_jet_clouds.jpg", "laptop_coding.jpg"]
    questions = ["What is this?", "Is there a cup? Answer yes or no.", "Read the text.", "Q", "How many?"]
    items = []
    for i, (name, q) in enumerate(zip(names, questions)):
        enc = encode_image(adapter, load_image(str(IMAGES / name)), q)
        k = [enc.n, 3, 5, 9, 1][i]
        sel = select_tokens(adapter, enc.prepared, enc.encoded, "divprune", k)
        items.append((enc.prepared, enc.encoded, sel.kept, sel.tokens))
    single = [adapter.generate(adapter.build_inputs(*it), 8) for it in items]
    batch = adapter.generate_batch(adapter.build_inputs_batch(items), 8)
    assert len({int(it[2].numel()) for it in items}) == len(items)
    assert [g.ids for g in batch] == [g.ids for g in single]
    assert [g.text for g in batch] == [g.text for g in single]
    inputs = adapter.build_inputs_batch(items)
    lengths = inputs.attention_mask.sum(1)
    assert inputs.attention_mask[:, -1].all() and len(set(lengths.tolist())) > 1  # left padding


def test_runner_batch_sizes_give_the_same_records(tiny_llava, tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "q.jsonl", PLAIN), image_root=IMAGES)
    outs = []
    for bs in (1, 4):
        spec = EvalSpec(model="tiny-llava", methods=["zoo", "divprune", "visionzip", "fastv"],
                        budgets=["4", "50%"], batch_size=bs, max_new_tokens=4, options={"m": 4, "h": 0.01, "estimator": "fd"})
        with RecordWriter(tmp_path / f"b{bs}.jsonl") as w:
            stats = run_eval(tiny_llava, [Dataset("q", samples)], spec, w)
        assert stats.predictions == len(PLAIN) * 9
        outs.append(stable(tmp_path / f"b{bs}.jsonl"))
    assert outs[0] == outs[1]
    recs = list(outs[1].values())
    assert {r["budget"] for r in recs} == {None, 4, "50%"}
    assert all(r["kept_tokens"] == 4 for r in recs if r["budget"] == 4)
    assert all(r["kept_tokens"] == r["n_visual_tokens"] for r in recs if r["method"] == "none")
    assert all(r["meaningless"] and r["model"] == "tiny-llava" for r in recs)
    rows = list(read_records(tmp_path / "b4.jsonl"))
    assert {r["batch_rows"] for r in rows if r["method"] == "zoo"} == {4, 1}  # 5 samples: 4 + 1
    assert {r["batch_rows"] for r in rows if r["method"] == "fastv"} == {1}  # in-LLM: one at a time
    assert all({"vision", "selection", "prefill", "decode", "e2e"} <= set(r["timings_ms"]) for r in rows)


# ------------------------------------------------------------------------------ resume / crash


def test_crash_mid_run_keeps_finished_batches_and_resume_completes(tiny_llava, tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "q.jsonl", PLAIN), image_root=IMAGES)
    spec = EvalSpec(model="tiny-llava", methods=["divprune"], budgets=["4"], batch_size=2, max_new_tokens=4)
    calls = []

    def dying_loader(path):
        calls.append(path)
        if len(calls) == 3:  # the first image of the second batch
            raise RuntimeError("power cut")
        return load_image(path)

    out = tmp_path / "run.jsonl"
    with pytest.raises(RuntimeError, match="power cut"), RecordWriter(out) as w:
        run_eval(tiny_llava, [Dataset("q", samples)], spec, w, load_image=dying_loader)
    kept = stable(out)
    assert {(k[1], k[2]) for k in kept} == {(i, m) for i in ("a", "b") for m in ("none", "divprune")}

    from zoocli.evaluation import done_keys

    with RecordWriter(out) as w:
        stats = run_eval(tiny_llava, [Dataset("q", samples)], spec, w, done=done_keys(out))
    assert stats.skipped == 4 and stats.predictions == (len(PLAIN) - 2) * 2
    with RecordWriter(tmp_path / "clean.jsonl") as w:
        run_eval(tiny_llava, [Dataset("q", samples)], spec, w)
    assert stable(out) == stable(tmp_path / "clean.jsonl")


def test_cli_resume_reports_the_same_summary_without_running(tiny_llava, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pope.jsonl", POPE)
    out = tmp_path / "run.jsonl"
    args = ["eval", data, "--image-root", IMAGES, "--methods", "zoo", "--budgets", "4", "--out", out, *FAST]
    first = json.loads(run(*args, "--json").stdout)
    assert first["run"]["predictions"] == 6

    import zoocli.adapters

    def no_model(*a, **k):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr(zoocli.adapters, "load_adapter", no_model)
    second = json.loads(run(*args, "--json").stdout)
    assert second["run"]["predictions"] == 0 and second["run"]["resumed"] == 6
    assert second["summary"] == first["summary"] and second["metrics"] == first["metrics"]
    text = run(*args).stdout
    assert "0 predictions" in text and "chance" in text


def test_cli_progress_lines_off_a_terminal_and_the_rerun_says_what_it_keeps(tiny_llava, tmp_path):
    """stderr is not a terminal here: one plain line per finished batch of predictions."""
    data = write_jsonl(tmp_path / "pope.jsonl", POPE)
    out = tmp_path / "run.jsonl"
    args = ["eval", data, "--image-root", IMAGES, "--methods", "divprune", "--budgets", "4", "--out", out,
            "--batch-size", "3", "--max-new-tokens", "3", "--model", "tiny-llava"]
    res = run(*args)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("eval: ")]
    assert [ln.split(" predictions done ")[0] for ln in lines] == ["eval: 3/6", "eval: 6/6"]
    assert "(pope · none)" in lines[0] and "(pope · divprune@4)" in lines[1] and lines[1].endswith(" s")
    again = run(*args[:5], "divprune,random", *args[6:])  # a third config: the first two resume
    assert "eval: 6 predictions already in" in again.stderr and "3 to go" in again.stderr
    assert [ln.split(" predictions done ")[0] for ln in again.stderr.splitlines()
            if " predictions done " in ln] == ["eval: 3/3"]


def test_resume_refuses_other_settings(tiny_llava, tmp_path):
    data = write_jsonl(tmp_path / "pope.jsonl", POPE[:1])
    out = tmp_path / "run.jsonl"
    run("eval", data, "--image-root", IMAGES, "--methods", "divprune", "--budgets", "4", "--out", out, *FAST)
    res = run("eval", data, "--image-root", IMAGES, "--methods", "divprune", "--budgets", "4", "--out", out,
              *FAST[:-2], "--model", "tiny-qwen2.5-vl", code=1)
    assert "tiny-llava" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------ CLI


def test_cli_json_keys_and_pope_metrics(tiny_llava, tmp_path):
    data = write_jsonl(tmp_path / "pope.jsonl", POPE)
    d = json.loads(run("eval", data, "--image-root", IMAGES, "--methods", "zoo,divprune", "--budgets", "8,4",
                       "--batch-size", "2", *FAST, "--json").stdout)
    for key in ("model", "meaningless", "note", "datasets", "methods", "budgets", "summary", "metrics", "run"):
        assert key in d
    assert d["meaningless"] is True and "chance" in d["note"]
    assert d["methods"] == ["none", "zoo", "divprune"] and d["budgets"] == [8, 4]
    assert d["datasets"] == [{"name": "pope", "path": str(data), "n": 3}]
    combos = {(r["method"], r["budget"], r["dataset"]) for r in d["summary"]}
    assert ("none", None, "pope") in combos and ("zoo", 4, "mean") in combos and len(combos) == 10
    for r in d["summary"]:
        assert {"n", "score", "retention", "samples_per_s"} <= set(r)
    base = [r for r in d["summary"] if r["method"] == "none" and r["dataset"] == "pope"][0]
    assert base["n"] == 3 and (base["retention"] in (1.0, None))
    m = d["metrics"][0]
    assert {"precision", "recall", "f1", "yes_ratio", "accuracy"} <= set(m["yesno"])
    assert d["run"]["predictions"] == 15 and d["run"]["samples_per_s"] > 0


def test_cli_shipped_sample_set_runs_offline(tiny_llava):
    res = run("eval", "--methods", "zoo", "--budgets", "4", "--batch-size", "8", *FAST)
    out = res.stdout
    assert "sample_eval" in out and "zoo" in out and "none" in out
    assert "76 predictions" in out and "samples/s" in out
    assert "random weights" in out and "chance" in out


@pytest.mark.parametrize("rows, needles", [
    ([PLAIN[0], {"id": "x", "image": "cat_chelsea.png", "answer": "cat", "question": 3}],
     ["line 2", "'question'"]),
    ([PLAIN[0], PLAIN[1], {"id": "y", "image": "cat_chelsea.png", "question": "q"}], ["line 3", "'answer'"]),
    ([PLAIN[0], {"id": "z", "image": "no_such.png", "question": "q", "answer": "a"}], ["line 2", "no_such.png"]),
])
def test_cli_bad_input_is_one_line_error_with_line_number(tmp_path, rows, needles):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    res = run("eval", data, "--image-root", IMAGES, *FAST, code=1)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in res.stdout + res.stderr, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("args, needle", [
    (["--budgets", "64,abc"], "--budgets"),
    (["--budgets", "0"], "0"),
    (["--batch-size", "0"], "--batch-size"),
    (["--methods", "nope"], "nope"),
])
def test_cli_bad_options_are_usage_errors(args, needle):
    res = run("eval", *FAST, *args, code=2)
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr


# ------------------------------------------------------------------------------ data parallel


def test_torchrun_two_processes_equal_one(tiny_llava, zoo_model_cache, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", PLAIN)
    common = [data, "--image-root", IMAGES, "--methods", "divprune,zoo", "--budgets", "4",
              "--batch-size", "2", "--max-new-tokens", "3", "--model", "tiny-llava"]
    run("eval", *common, "--estimator", "fd", "--m", "4", "--out", tmp_path / "one.jsonl")

    home = tmp_path / "home"
    (home / ".cache" / "zoo").mkdir(parents=True)
    (home / ".cache" / "zoo" / "models").symlink_to(zoo_model_cache)
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "zoocli", "eval", *map(str, common), "--estimator", "fd", "--zoo-m", "4", "--out", str(tmp_path / "two.jsonl")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert stable(tmp_path / "two.jsonl") == stable(tmp_path / "one.jsonl")
    assert res.stdout.count("accuracy retention") == 1  # rank 0 alone prints the summary
    assert "15 predictions" in res.stdout and "2 processes" in res.stdout
    assert not list(tmp_path.glob("two.rank*.jsonl"))  # shards merged and removed
    one = summarize(read_records(tmp_path / "one.jsonl"))
    two = summarize(read_records(tmp_path / "two.jsonl"))
    assert one == two


# ------------------------------------------------------------------------------ method options


def test_cli_estimator_rank_and_scope_reach_the_method_options(tiny_llava, tmp_path, monkeypatch):
    """Regression: `eval` hard-coded the fd estimator and dropped --rank and --budget-scope."""
    import zoocli.eval_runner

    seen = []
    real = zoocli.eval_runner.run_eval

    def spy(adapter, datasets, spec, writer, **kw):
        seen.append(spec)
        return real(adapter, datasets, spec, writer, **kw)

    monkeypatch.setattr(zoocli.eval_runner, "run_eval", spy)
    data = write_jsonl(tmp_path / "pope.jsonl", POPE[:1])
    d = json.loads(run("eval", data, "--image-root", IMAGES, "--methods", "zoo", "--budgets", "4",
                       *FAST, "--estimator", "jvp", "--rank", "2", "--budget-scope", "global",
                       "--out", tmp_path / "run.jsonl", "--json").stdout)
    assert seen[0].options["estimator"] == "jvp" and seen[0].options["rank"] == 2
    assert seen[0].scope == "global"
    assert d["settings"]["estimator"] == "jvp" and d["settings"]["scope"] == "global"
    recs = list(read_records(tmp_path / "run.jsonl"))
    assert len(recs) == 2 and all(r["settings"]["rank"] == 2 for r in recs)


def test_cli_files_from_before_the_estimator_option_resume_as_fd(tiny_llava, tmp_path):
    """Files written before eval took --estimator (always fd) resume with --estimator fd, and a run
    with the exact default refuses them (other settings) instead of mixing estimators."""
    data = write_jsonl(tmp_path / "pope.jsonl", POPE[:1])
    out = tmp_path / "run.jsonl"
    args = ["eval", data, "--image-root", IMAGES, "--methods", "divprune", "--budgets", "4", *FAST,
            "--out", out]
    d = json.loads(run(*args, "--json").stdout)
    assert d["settings"]["estimator"] == "fd" and "rank" not in d["settings"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for r in rows:  # as an old file: no estimator key
        r["settings"].pop("estimator")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = json.loads(run(*args, "--json").stdout)
    assert again["run"]["predictions"] == 0 and again["run"]["resumed"] == len(rows)
    exact = ["eval", data, "--image-root", IMAGES, "--methods", "divprune", "--budgets", "4",
             "--max-new-tokens", "3", "--model", "tiny-llava", "--out", out]
    res = run(*exact, code=1)
    assert "other settings" in res.stderr and "estimator" in res.stderr

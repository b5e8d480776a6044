"""zoo as an lmms-eval model (``zoocli.lmms_eval_model``) and the shipped offline task
``zoo_sample``: registration, model_args, answers equal to ``zoo ask``'s, the metric, errors,
per-request statistics, and a two-process torchrun run (tiny offline models, CPU).

Skipped only when lmms-eval is not installed (``pip install -e ".[test]"`` plus the lmms
recipe of .ci/run installs it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (see .ci/run for the CPU install)", allow_module_level=True)

from lmms_eval.api.instance import Instance  # noqa: E402

from zoocli.cli.common import MethodOptions  # noqa: E402
from zoocli.errors import UsageError, ZooError  # noqa: E402
from zoocli.evaluation import SAMPLE_EVAL, load_samples, score_one  # noqa: E402
from zoocli.images import load_image  # noqa: E402
from zoocli.lmms_eval_model import MODEL_ARGS, ZooLMM, cut_at, parse_model_args  # noqa: E402
from zoocli.pipeline import run_one  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "zoocli" / "lmms_tasks"
IMAGES = REPO / "sample_images"
LIMIT = 6
FAST = dict(pretrained="tiny-llava", keep=8, estimator="fd", m=4, batch_size=4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """lmms-eval's load_dataset caches under the test's tmp dir, not ~/.cache (lmms-eval reads
    these variables when it loads a task's data)."""
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def make_lm(zoo_model_cache, **kw) -> ZooLMM:
    return ZooLMM(**{**FAST, "cache_dir": str(zoo_model_cache), **kw})


def evaluate(lm, tmp_path, model_args: str = "", **kw) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(model=lm, model_args=model_args, tasks=["zoo_sample"], limit=LIMIT,
                           task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
                           gen_kwargs="max_new_tokens=3", process_docs_parallel=1, **kw)


def ask(adapter, sample, method="zoo", keep="8", max_new_tokens=3, **extra) -> str:
    """What `zoo ask IMAGE QUESTION --method M --keep K --estimator fd --m 4` prints as the
    answer (its option group, then `run_one`, as cli/ask.py does)."""
    group = MethodOptions(m=4, estimator="fd")
    return run_one(adapter, load_image(IMAGES / sample.image), sample.question, method, keep,
                   scope=group.budget_scope, seed=group.seed, options={**group.zoo(), **extra},
                   max_new_tokens=max_new_tokens).answer


def predictions(results: dict) -> dict[int, str]:
    return {s["doc_id"]: first(s["filtered_resps"]) for s in results["samples"]["zoo_sample"]}


def first(resps):
    return resps[0] if isinstance(resps, list) else resps


# ------------------------------------------------------------------------------ registration


def test_entry_point_registers_the_zoo_model():
    from lmms_eval.models import get_model

    assert get_model("zoo") is ZooLMM  # through the `lmms_eval.models` entry point


def test_unknown_model_args_are_refused_with_the_known_keys():
    with pytest.raises(UsageError) as e:
        ZooLMM.create_from_arg_string("pretrained=tiny-llava,kep=64,foo=1")
    msg = str(e.value)
    assert "unknown keys foo, kep" in msg
    for key in ("keep", "method", "estimator", "budget_scope", "m", "h", "rank", "seed", "dtype", "device"):
        assert key in msg.split("known:")[1]


@pytest.mark.parametrize("args, needle", [
    ("keep=0", "keep must be at least 1"), ("keep=abc", "keep 'abc'"), ("keep=150%", "(0, 100]"),
    ("method=nope", "unknown method 'nope'"), ("method=zoo:bogus=1", "no option 'bogus'"),
    ("estimator=xyz", "--estimator 'xyz'"), ("m=0", "--m must be at least 1"),
    ("h=-1", "--h must be a positive"), ("rank=2.5", "rank=2.5"), ("budget_scope=all", "'all'"),
    ("batch_size=auto", "batch_size='auto'"), ("random_weights=maybe", "random_weights"),
])
def test_bad_model_args_are_refused_before_loading(args, needle):
    with pytest.raises(UsageError) as e:
        ZooLMM.create_from_arg_string(f"pretrained=no-such-model,{args}")
    assert needle in str(e.value)


def test_model_args_take_what_zoo_ask_takes():
    a = parse_model_args(pretrained="x", method="zoo:estimator=jvp", keep="11%", m=8, h=0.5,
                         estimator="jvp", rank=4, seed=3, budget_scope="global", dtype="bf16",
                         device="cpu", batch_size="8", max_batch_size=None)
    assert (a.keep, a.batch_size, a.method_options.seed, a.method_options.budget_scope) == ("11%", 8, 3, "global")
    assert a.zoo_options == MethodOptions(m=8, h=0.5, estimator="jvp", rank=4).zoo()
    assert parse_model_args(keep=64, rank="none").keep == "64"
    assert parse_model_args().zoo_options == MethodOptions().zoo()  # zoo ask's defaults
    assert set(MODEL_ARGS) >= {"method", "keep", "estimator", "m", "h", "rank", "seed",
                               "budget_scope", "dtype", "device"}


@pytest.mark.parametrize("args, needle", [
    ("max_new_tokens=40000", "max_new_tokens must be at least 1 and at most 32768, got 40000"),
    ("batch_size=100000", "batch_size must be at least 1 and at most 4096"),
    ("max_batch_size=0", "max_batch_size must be at least 1"),
    ("pretrained=" + "x" * 20_000, "pretrained is 20,000 characters long"),
], ids=["max_new_tokens", "batch_size", "max_batch_size", "long_pretrained"])
def test_model_args_have_the_clis_caps(args, needle):
    with pytest.raises(UsageError) as e:
        ZooLMM.create_from_arg_string(f"pretrained=no-such-model,{args}")
    assert needle in str(e.value) and len(str(e.value)) < 300


def test_model_args_of_absurd_size_are_one_line():
    # (lmms-eval's own arg-string parser fails on 5,000 digits; a caller's dict still gets here)
    for kw, needle in ((dict(max_new_tokens="9" * 5000), "max_new_tokens is a number of 5,000 digits"),
                       (dict(seed="1" * 20_000), "seed is 20,000 characters long")):
        with pytest.raises(UsageError) as e:
            parse_model_args(pretrained="x", **kw)
        assert needle in str(e.value) and len(str(e.value)) < 300


def test_cache_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(UsageError, match="cache_dir=.*notes.txt is not a folder"):
        parse_model_args(pretrained="tiny-llava", cache_dir=str(f))
    assert f.read_text() == "mine"


@pytest.mark.parametrize("gen, needle", [
    ("not a dict", "gen_kwargs must be a table"),
    ({"max_new_tokens": 10**9}, "max_new_tokens must be an integer from 1 to 32768, got 1000000000"),
    ({"max_new_tokens": "16"}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer from 1"),
    ({"max_new_tokens": 16.0}, "max_new_tokens must be an integer"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"temperature": float("nan")}, "temperature must be a number"),
    ({"do_sample": "yes"}, "do_sample must be true or false"),
    ({"num_beams": [2]}, "num_beams must be an integer"),
    ({"until": 5}, "until must be a string or a list of strings"),
    ({"until": ["a", None]}, "until must be a string or a list of strings"),
    ({"until": ["x"] * 1000}, "until takes at most 256 strings"),
    ({"until": ["x" * 100_000]}, "until takes at most 256 strings of at most 10,000 characters"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_gen_kwargs_are_type_checked_and_bounded(gen, needle):
    from zoocli.lmms_eval_model import generation_settings

    with pytest.raises(UsageError) as e:
        generation_settings(gen, 64)
    assert needle in str(e.value) and len(str(e.value)) < 300


def test_gen_kwargs_that_are_fine():
    from zoocli.lmms_eval_model import generation_settings

    assert generation_settings({}, 64) == (64, [])
    assert generation_settings(None, 64) == (64, [])
    assert generation_settings({"max_new_tokens": 32768, "temperature": 0, "do_sample": False, "num_beams": 1,
                                "top_p": 1.0, "until": "\n\n"}, 64) == (32768, ["\n\n"])
    assert generation_settings({"until": ["", "ASSISTANT:"], "temperature": 0.0}, 8) == (8, ["ASSISTANT:"])


def test_cut_at_until():
    assert cut_at(" yes\n\nno ", ["\n\n"]) == "yes"
    assert cut_at("a.b.c", [".", "b"]) == "a"
    assert cut_at("  plain  ", []) == "plain"


# ------------------------------------------------------------------------------ the local task


@pytest.mark.slow
def test_local_task_metric_and_answers_equal_zoo_ask(tiny_llava, zoo_model_cache, datasets_cache, tmp_path):
    lm = make_lm(zoo_model_cache, stats=str(tmp_path / "stats.jsonl"))
    args = "pretrained=tiny-llava,keep=8,estimator=fd,m=4"
    res = evaluate(lm, tmp_path, model_args=args)
    assert res["config"]["model_args"] == args
    samples = load_samples(SAMPLE_EVAL)[:LIMIT]
    preds = predictions(res)
    assert sorted(preds) == list(range(LIMIT))
    for i, s in enumerate(samples):
        expected = ask(tiny_llava, s)
        assert "\n\n" not in expected  # (else lmms-eval's default `until` would cut it)
        assert preds[i] == expected, (s.id, preds[i], expected)
    metric = res["results"]["zoo_sample"]["score,none"]
    assert metric == pytest.approx(sum(score_one(s, preds[i])[0] for i, s in enumerate(samples)) / LIMIT)

    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in stats] == list(range(LIMIT))
    for r in stats:
        assert (r["task"], r["method"], r["keep"], r["kept_tokens"]) == ("zoo_sample", "zoo", "8", 8)
        assert r["n_visual_tokens"] > 8 and r["selection_ms"] > 0 and r["prefill_ms"] > 0
        assert r["batch_rows"] == (4 if r["doc_id"] < 4 else 2)


def test_task_hooks_score_like_zoo_eval():
    import importlib.util as iu

    spec = iu.spec_from_file_location("zoo_sample_utils", TASKS / "zoo_sample" / "utils.py")
    utils = iu.module_from_spec(spec)
    spec.loader.exec_module(utils)
    by_id = {s.id: s for s in load_samples(SAMPLE_EVAL)}
    doc = {"id": "cats-count", "image": "two_cats_couch_remotes.jpg", "question": by_id["cats-count"].question}
    assert utils.process_results(doc, ["Two."]) == {"score": 1.0}  # "2" after VQA normalisation
    assert utils.process_results(doc, ["3"]) == {"score": 0.0}
    assert utils.doc_to_text(doc) == by_id["cats-count"].question
    assert utils.doc_to_visual(doc)[0].size == load_image(IMAGES / doc["image"]).size


# ------------------------------------------------------------------------------ requests


def request(i, ctx, gen, doc_id, task="t"):
    return Instance("generate_until", (ctx, gen, lambda doc: doc["visuals"], doc_id, task, "test"), i,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.mark.slow
def test_requests_max_new_tokens_order_until_and_methods(tiny_llava, zoo_model_cache):
    samples = load_samples(SAMPLE_EVAL)[:3]
    images = [load_image(IMAGES / s.image) for s in samples]
    lm = make_lm(zoo_model_cache, method="fastv:K=1", keep="50%", batch_size=2)
    lm.task_dict = {"t": {"test": [{"visuals": [im]} for im in images]}}
    gens = [{"max_new_tokens": 2, "until": []}, {"max_new_tokens": 4, "until": []},
            {"max_new_tokens": 2, "until": "\n\n", "temperature": 0}]
    reqs = [request(i, s.question, g, i) for i, (s, g) in enumerate(zip(samples, gens))]
    got = lm.generate_until(reqs)
    for s, g, answer in zip(samples, gens, got):  # in request order, each with its own length
        assert answer == ask(tiny_llava, s, "fastv", "50%",
                             max_new_tokens=g["max_new_tokens"], K=1)
    first = got[0]
    assert len(first) > 1
    cut = lm.generate_until([request(0, samples[0].question, {"max_new_tokens": 2, "until": [first[1:]]}, 0)])
    assert cut == [first[:1].strip()]


@pytest.mark.slow
def test_requests_that_cannot_be_answered_say_why(zoo_model_cache):
    lm = make_lm(zoo_model_cache)
    im = load_image(IMAGES / "cat_chelsea.png")
    lm.task_dict = {"t": {"test": [{"visuals": []}, {"visuals": [im, im]}, {"visuals": [im]},
                                   {"visuals": ["clip.mp4"]}]}}
    cases = [(0, {}, "no image"), (1, {}, "2 images"), (2, {"temperature": 0.7}, "greedily only"),
             (2, {"num_beams": 3}, "num_beams=3"), (3, {}, "not an image")]
    for doc_id, gen, needle in cases:
        with pytest.raises(UsageError) as e:
            lm.generate_until([request(0, "Q?", gen, doc_id)])
        assert needle in str(e.value)
    with pytest.raises(NotImplementedError, match="log-likelihoods, which mmbench_ppl need"):
        lm.loglikelihood([request(0, "Q?", {}, 2, task="mmbench_ppl")])
    with pytest.raises(NotImplementedError, match="multi-round generation, which mmmu_multi need"):
        lm.generate_until_multi_round([request(0, "Q?", {}, 2, task="mmmu_multi")])


def test_request_longer_than_the_context_and_bad_gen_kwargs_are_one_line(zoo_model_cache):
    lm = make_lm(zoo_model_cache)
    im = load_image(IMAGES / "cat_chelsea.png")
    lm.task_dict = {"t": {"test": [{"visuals": [im]}]}}
    with pytest.raises(ZooError, match=r"task t, doc 0: the prompt is [\d,]+ tokens .* context of 2,048 tokens"):
        lm.generate_until([request(0, "Is there a cat? " * 62_500, {"max_new_tokens": 2}, 0)])
    with pytest.raises(UsageError, match="task t: gen_kwargs: max_new_tokens must be an integer from 1 to 32768"):
        lm.generate_until([request(0, "Q?", {"max_new_tokens": 10**7}, 0)])


# ------------------------------------------------------------------------------ data parallel


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(zoo_model_cache, datasets_cache, tmp_path):
    one = predictions(evaluate(make_lm(zoo_model_cache), tmp_path))

    env = {**os.environ, "HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "hf-datasets-2"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = f"pretrained=tiny-llava,keep=8,estimator=fd,m=4,cache_dir={zoo_model_cache},stats={tmp_path / 'stats.jsonl'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lmms_eval", "--model", "zoo", "--model_args", args, "--include_path", str(TASKS),
           "--tasks", "zoo_sample", "--limit", str(LIMIT), "--batch_size", "4",
           "--gen_kwargs", "max_new_tokens=3", "--log_samples", "--output_path", str(tmp_path / "out"),
           "--process_docs_parallel", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    # lmms-eval exits 0 even when the evaluation failed: read its files
    logged = list((tmp_path / "out").rglob("*_samples_zoo_sample.jsonl"))
    assert res.returncode == 0 and len(logged) == 1, (res.stdout + res.stderr)[-4000:]
    two = {r["doc_id"]: first(r["filtered_resps"]) for r in map(json.loads, logged[0].read_text().splitlines())}
    assert two == one
    shards = sorted(p.name for p in tmp_path.glob("stats.rank*.jsonl"))
    assert shards == ["stats.rank0.jsonl", "stats.rank1.jsonl"]
    docs = [json.loads(line)["doc_id"] for p in tmp_path.glob("stats.rank*.jsonl")
            for line in p.read_text().splitlines()]
    assert sorted(docs) == list(range(LIMIT))  # each document answered once, by one rank

"""Errors that guide (issue 24): an unknown model name says so with the closest known names; a
model that is not available says what it is, how to get it and what runs offline instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import one_line_error, run
from zoocli.errors import UsageError, ZooError, is_allocation_failure

CUP = str(Path(__file__).resolve().parent.parent / "sample_images" / "coffee_cup.jpg")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No Hub and an empty Hugging Face cache: every alias is 'not available'."""
    import huggingface_hub.constants as hc

    import zoocli.adapters as adapters

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(adapters, "_hub_reachable", lambda timeout_s=3.0: False)


@pytest.mark.parametrize("name,close", [("demo-lava", "demo-llava"), ("tiny-lava", "tiny-llava"),
                                        ("llava1.5", "llava-1.5"), ("nosuchmodel", None)])
def test_unknown_model_names_the_closest(name, close):
    res = run("ask", CUP, "q", "--model", name, code=2)
    one_line_error(res, f"unknown model '{name}'", "known: llava-1.5,", "demo-llava")
    if close:
        assert f"did you mean {close}" in res.stderr
    else:
        assert "did you mean" not in res.stderr


def test_hf_ids_and_paths_are_not_unknown_names(tmp_path):
    from zoocli.adapters import check_model_name

    for name in ("llava-hf/llava-1.5-7b-hf", "someone/some-vlm", str(tmp_path), "demo-llava", "llava-next"):
        check_model_name(name)  # no error: these go to loading
    with pytest.raises(UsageError, match="unknown model 'llava-nxt': did you mean llava-next"):
        check_model_name("llava-nxt")


@pytest.mark.usefixtures("offline_hub")
def test_default_model_not_cached_names_itself_its_id_and_demo_llava():
    res = run("ask", CUP, "What is this?", code=1)  # no --model: the default
    one_line_error(res, "model 'llava-1.5' (the default --model) is llava-hf/llava-1.5-7b-hf",
                   "huggingface-cli download llava-hf/llava-1.5-7b-hf", "--model demo-llava",
                   "--model small-llava (offline, same llava family")


@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize("alias,repo,offline", [("qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct", "tiny-qwen2.5-vl"),
                                                ("llava-next", "llava-hf/llava-v1.6-vicuna-7b-hf", "small-llava-next")])
def test_other_aliases_not_cached(alias, repo, offline):
    res = run("score", CUP, "q", "--model", alias, code=1)
    one_line_error(res, f"model '{alias}' is {repo}", f"huggingface-cli download {repo}",
                   "--model demo-llava", f"--model {offline} (offline")
    assert "the default" not in res.stderr


@pytest.mark.parametrize("exc,yes", [
    (MemoryError(), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_allocation_failures_are_recognised(exc, yes):
    assert is_allocation_failure(exc) is yes


def test_allocation_failure_while_loading_is_one_line(monkeypatch):
    import zoocli.adapters as adapters

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1099511627776 bytes.\nError code 12")

    monkeypatch.setattr(adapters, "_load_shipped", no_memory)
    with pytest.raises(ZooError, match="out of memory on cpu while loading demo-llava") as e:
        adapters.load_adapter("demo-llava", device="cpu")
    assert "\n" not in str(e.value)
    res = run("ask", CUP, "q", "--model", "demo-llava", code=1)
    one_line_error(res, "out of memory on cpu while loading demo-llava", "--dtype bf16")


@pytest.mark.parametrize("command,usage", [
    ("ask", "[OPTIONS] IMAGE QUESTION"), ("compare", "[OPTIONS] [IMAGE] [QUESTION]"),
    ("score", "[OPTIONS] [IMAGE] [QUESTION]"), ("eval", "[OPTIONS] [DATA]..."), ("bench", "[OPTIONS]"),
])
def test_usage_lines_are_clean(command, usage):
    out = run(command, "--help").stdout
    line = next(x for x in out.splitlines() if "Usage:" in x)
    assert line.strip().endswith(f"{command} {usage}"), line
    assert "{" not in out and "<bool>" not in out


def test_root_help_shows_no_bool_type():
    out = run("--help").stdout
    assert "<bool>" not in out and "--version" in out


def test_answers_are_shown_escaped_and_raw_in_json():
    from zoocli.render import answer_panel, compare_table
    from zoocli.text import plural, shown

    assert shown("red\x03\ufffd\ufffd\ufffd\u202e") == "red\\x03\\ufffd x3\\u202e"
    assert shown("a\nb\tc é 中 \ufffd") == "a\nb\tc é 中 \ufffd"  # text, a lone U+FFFD kept
    assert plural(1, "new token") == "1 new token" and plural(3, "new token") == "3 new tokens"
    from rich.console import Console

    def text(r):
        c = Console(width=120, record=True, color_system=None)
        c.print(r)
        return c.export_text()

    res = {"answer": "red\x03\ufffd\ufffd", "method": "zoo", "kept_indices": [1], "n_visual_tokens": 4,
           "n_llm_visual_kept": 1, "n_llm_visual_full": 4, "model": "m"}
    assert "red\\x03\\ufffd x2" in text(answer_panel(res)) and "\x03" not in text(answer_panel(res))


def test_models_marks_the_default_and_shows_tokens_and_disk():
    from cli_helpers import run_json

    rows = {r["name"]: r for r in run_json("models")}
    assert rows["llava-1.5"]["default"] and sum(r["default"] for r in rows.values()) == 1
    assert rows["llava-1.5"]["visual_tokens"] == "576" and rows["demo-llava"]["visual_tokens"] == "144"
    assert rows["demo-llava"]["cached"] and rows["demo-llava"]["size_bytes"] > 1_000_000
    out = run("models").stdout
    assert "llava-1.5 *" in out and "default" in out


def test_ask_json_names_its_image_and_question():
    from cli_helpers import run_json

    d = run_json("ask", CUP, "What is it?", "--model", "tiny-llava", "--keep", "4", "--max-new-tokens", "1")
    assert d["image"] == CUP and d["question"] == "What is it?"


def test_demo_llava_default_sample_is_a_shapes_image():
    from zoocli.bench import sample_example

    path, q = sample_example("demo-llava")
    assert path.parent.name == "shapes" and path.is_file() and "circle" in q
    assert sample_example("tiny-llava")[0].name == "two_cats_couch_remotes.jpg"


# ---- long work says what it will do (issue 24)

BENCH = ["bench", "--model", "tiny-llava", "--budgets", "8,4", "--methods", "zoo,divprune", "--images", CUP,
         "--max-new-tokens", "2"]


def test_bench_prints_its_plan_and_a_line_per_repeat_off_a_terminal():
    res = run(*BENCH, "--repeats", "2", "--warmup", "1")
    err = res.stderr.splitlines()
    plan = [ln for ln in err if ln.startswith("bench: plan: ")]
    assert plan == ["bench: plan: 5 rows (the unpruned row + 2 methods x 2 budgets) x 1 image x 3 repeats "
                    "(1 warm-up + 2 timed) = 15 model runs, 2 new tokens each; a time estimate after the first repeat"]
    reps = [ln for ln in err if ln.startswith("bench: repeat ")]
    assert [ln.split(" done ")[0] for ln in reps] == ["bench: repeat 1/3", "bench: repeat 2/3", "bench: repeat 3/3"]
    assert "(warm-up)" in reps[0] and "(timed)" in reps[1] and ", eta " in reps[0] and ", eta" not in reps[2]
    assert err.index(plan[0]) < err.index(reps[0])
    # the offline model's timings are real, its words are not
    assert "random weights" in res.stdout


def test_bench_on_an_offline_model_on_cpu_chooses_a_small_budget_of_work_and_says_so():
    res = run("bench", "--model", "tiny-llava", "--budgets", "4", "--methods", "divprune", "--device", "cpu",
              "--json")
    said = [ln for ln in res.stderr.splitlines() if "offline model on CPU" in ln]
    assert said == ["bench: tiny-llava is an offline model on CPU: 1 image (two_cats_couch_remotes.jpg), "
                    "3 repeats, 4 new tokens by default, to finish in minutes (give --images, --repeats, "
                    "--max-new-tokens to choose)"]
    rows = json.loads(res.stdout)
    assert rows[0]["key"]["repeats"] == 3 and rows[0]["key"]["images"] == ["two_cats_couch_remotes.jpg"]
    assert rows[0]["key"]["max_new_tokens"] == 4
    # what the user gives is kept, and only the rest is chosen
    res = run("bench", "--model", "tiny-llava", "--budgets", "4", "--methods", "divprune", "--device", "cpu",
              "--repeats", "1", "--json")
    assert "1 image (two_cats_couch_remotes.jpg), 4 new tokens by default" in res.stderr
    assert json.loads(res.stdout)[0]["key"]["repeats"] == 1


def test_bench_defaults_stay_for_real_models():
    from zoocli.cli.bench import quick_defaults

    assert quick_defaults("tiny-llava", "cpu", False) and quick_defaults("demo-llava", "cpu", False)
    assert not quick_defaults("llava-1.5", "cpu", False) and not quick_defaults("tiny-llava", "cuda", False)
    assert not quick_defaults("llava-1.5", "cpu", True)


def test_eval_lines_off_a_terminal_come_every_tenth_or_30_s(monkeypatch):
    from zoocli.cli import progress

    lines = []
    monkeypatch.setattr(progress.err, "print", lambda text, **kw: lines.append(text))
    with progress.Steps("eval", 1000, "predictions", log_rate=(0.10, 30.0)) as steps:
        for _ in range(1000):
            steps.finished("x")
    # the first unit (the run is alive), then every 100th
    assert [ln.split(" predictions")[0] for ln in lines] == ["eval: 1/1000"] + [f"eval: {i}/1000" for i in range(100, 1001, 100)]
    assert ", eta " in lines[0] and lines[-1].startswith("eval: 1000/1000") and "eta" not in lines[-1]
    clock = iter(range(0, 10**6, 40))  # 40 s per prediction: every one is 30 s after the last line
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    lines.clear()
    with progress.Steps("eval", 1000, "predictions", log_rate=(0.10, 30.0)) as steps:
        for _ in range(5):
            steps.finished("x")
    assert len(lines) == 5

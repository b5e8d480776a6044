"""Errors that guide (issue 24): an unknown model name says so with the closest known names; a
model that is not available says what it is, how to get it and what runs offline instead."""

from __future__ import annotations

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

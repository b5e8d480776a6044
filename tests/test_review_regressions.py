"""Regression tests for bugs found in review: each one crashed, or printed invalid output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoocli.errors import UsageError
from zoocli.methods import parse_method_spec
from cli_helpers import run, one_line_error

pytestmark = pytest.mark.usefixtures("offline_models")

REPO = Path(__file__).resolve().parent.parent
CUP = str(REPO / "sample_images" / "coffee_cup.jpg")
FAST = ["--max-new-tokens", "1", "--estimator", "fd", "--m", "4"]


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON; other parsers reject them)."""
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=bad)


# ---- method options of the wrong type were a traceback (ValueError / TypeError), not a usage error

@pytest.mark.parametrize("spec", [
    "zspaprune:core_ratio=abc", "zspaprune:core_ratio=2", "zspaprune:prompt_scope=x",
    "visionzip:dominant=abc", "visionzip:dominant=1.5", "visionzip:contextual=abc",
])
def test_bad_method_option_values_are_usage_errors_at_parse_time(spec):
    with pytest.raises(UsageError):
        parse_method_spec(spec)


@pytest.mark.parametrize("spec", ["zspaprune:core_ratio=abc", "visionzip:dominant=abc"])
def test_bad_method_option_values_on_the_command_line(spec):
    res = run("ask", CUP, "q", "--model", "tiny-llava", "--keep", "4", "--method", spec, *FAST, code=2)
    one_line_error(res, spec.split(":")[0])


def test_good_method_option_values_still_parse():
    assert parse_method_spec("zspaprune:core_ratio=0:prompt_scope=all_text") == (
        "zspaprune", {"core_ratio": 0, "prompt_scope": "all_text"})
    assert parse_method_spec("visionzip:dominant=3") == ("visionzip", {"dominant": 3})


# ---- a seed torch cannot take was a traceback from torch.Generator.manual_seed

@pytest.mark.parametrize("seed", ["99999999999999999999", "-99999999999999999999"])
def test_out_of_range_seed_is_a_usage_error(seed):
    res = run("ask", CUP, "q", "--model", "tiny-llava", "--keep", "4", "--seed", seed, *FAST, code=2)
    one_line_error(res, "--seed")


def test_out_of_range_seed_in_the_library():
    import torch

    from zoocli.sensitivity import token_sensitivity

    with pytest.raises(UsageError):
        token_sensitivity(torch.randn(3, 4), torch.nn.Linear(4, 2), m=2, seed=2**70)


# ---- scopes with no budget left NaN scores in `ask --json` (NaN is not JSON)

def test_ask_json_is_valid_json_when_some_crops_get_no_budget():
    # tiny-llava-next splits the budget over the base image and its crops: keep 1 leaves the crops
    # with nothing to select, so their tokens have no score
    res = run("ask", CUP, "q", "--model", "tiny-llava-next", "--keep", "1", "--json", *FAST)
    d = _strict_json(res.stdout)
    assert len(d["scopes"] if "scopes" in d else d["per_scope"]) > 1
    assert None in d["scores"] and any(isinstance(v, float) for v in d["scores"])
    assert len(d["kept_indices"]) == 1


# ---- `--json` never prints NaN / Infinity (e.g. Spearman of constant scores is NaN)

def test_print_json_writes_null_for_non_finite_numbers(capsys):
    from zoocli.cli.common import print_json as _print_json

    _print_json({"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": 2})
    assert _strict_json(capsys.readouterr().out) == {"a": None, "b": [1.5, None, {"c": None}], "d": 2}


# ---- output paths: a directory is refused before any model loads; an unwritable --out is one line

def test_overlay_that_is_a_directory_is_refused_up_front(tmp_path, monkeypatch):
    import zoocli.adapters

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the --overlay path was checked")

    monkeypatch.setattr(zoocli.adapters, "load_adapter", no_load)
    for cmd in (["ask", CUP, "q"], ["score", CUP], ["compare", CUP, "q"]):
        res = run(*cmd, "--model", "tiny-llava", "--overlay", tmp_path, code=2)
        one_line_error(res, "--overlay", "directory")


def test_bench_out_unwritable_or_unreadable_is_one_line(tmp_path, monkeypatch):
    import zoocli.adapters

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(zoocli.adapters, "load_adapter", no_load)
    bench = ["bench", "--model", "tiny-llava", "--images", CUP, "--budgets", "4", "--methods", "divprune",
             "--repeats", "1", "--warmup", "0", "--max-new-tokens", "1"]
    res = run(*bench, "--out", tmp_path, code=2)
    one_line_error(res, "--out", "directory")
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, where no file can be created even by root")
    res = run(*bench, "--out", "/proc/zoo-bench.jsonl", code=1)
    one_line_error(res, "cannot write")


def test_bench_out_that_is_not_text_is_one_line(tmp_path):
    from zoocli.bench import done_keys
    from zoocli.errors import ZooError

    bad = tmp_path / "r.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ZooError, match="cannot read"):
        done_keys(bad)


def test_append_row_failure_is_a_zoo_error(tmp_path):
    from zoocli.bench import append_row
    from zoocli.errors import ZooError

    with pytest.raises(ZooError, match="cannot write"):
        append_row(tmp_path / "no" / "such" / "r.jsonl", {"a": 1})

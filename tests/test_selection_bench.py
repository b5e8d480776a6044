"""zoo bench-kernel's selection rows (zoocli/selection_bench.py): counts, not times."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from zoocli.selection_bench import selection_bench

SMALL = (("tiny 2x40>5", 2, 40, 16, 5), ("tiny 1x90>12", 1, 90, 8, 12))


def test_rows_count_ops_and_agree_on_picks():
    pytest.importorskip("triton", reason="the fused kernel's rows need triton (optional)")
    rows = selection_bench(repeats=1, warmup=0, shapes=SMALL, backends=["torch", "triton"])
    assert [(r["shape"], r["backend"]) for r in rows] == [
        ("tiny 2x40>5", "torch"), ("tiny 2x40>5", "triton"), ("tiny 1x90>12", "torch"), ("tiny 1x90>12", "triton")]
    for r in rows:
        assert r["same_picks"] and r["syncs"] == 0 and r["median_ms"] >= 0
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    triton_rows = [r for r in rows if r["backend"] == "triton"]
    assert all(r["launches"] == 0 and r["ops"] > 4 * (r["k"] - 1) for r in torch_rows)
    assert all(r["launches"] == 1 and r["ops"] <= 30 and r["interpreted"] for r in triton_rows)


def test_bench_kernel_part_is_checked():
    from zoocli.cli import app

    res = CliRunner().invoke(app, ["bench-kernel", "--part", "gpu"])
    assert res.exit_code == 2 and "--part 'gpu': choose all, sensitivity, selection" in res.output


def test_bench_kernel_selection_json(monkeypatch):
    import zoocli.selection_bench as sb
    from zoocli.cli import app

    monkeypatch.setattr(sb, "SHAPES", SMALL)
    res = CliRunner().invoke(app, ["bench-kernel", "--part", "selection", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("["):])
    assert {r["shape"] for r in doc} == {"tiny 2x40>5", "tiny 1x90>12"} and all(r["part"] == "selection" for r in doc)
    assert {r["backend"] for r in doc} == {"torch", "triton"}  # triton's rows either way
    triton_rows = [r for r in doc if r["backend"] == "triton"]
    if importlib.util.find_spec("triton") is None:
        assert all(r["unavailable"] == "triton not installed" and "median_ms" not in r for r in triton_rows)
    else:
        assert all("unavailable" not in r and r["same_picks"] for r in triton_rows)


@pytest.mark.parametrize("part", ["selection", "all"])
def test_bench_kernel_without_triton_says_so(monkeypatch, part):
    """Triton is optional: without it the selection part runs the torch rows and its triton rows say
    "triton not installed" (never an import traceback)."""
    import zoocli.kernel_bench as kb
    import zoocli.selection_bench as sb
    from zoocli.cli import app

    monkeypatch.setattr(sb, "SHAPES", SMALL)
    monkeypatch.setattr(sb, "unavailable_backends", lambda device: {"triton": "triton not installed"})
    if part == "all":
        monkeypatch.setattr(kb, "sensitivity_bench", lambda **kw: [])
    res = CliRunner().invoke(app, ["bench-kernel", "--part", part, "--repeats", "1", "--warmup", "0"],
                             env={"COLUMNS": "100"})
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "triton: triton not installed" in res.output and "tiny 2x40>5" in res.output


def test_available_backends_match_what_is_installed():
    """Without triton: 'triton not installed'; with it (tests run its CPU interpreter, conftest.py):
    both backends."""
    from zoocli.selection_bench import available_backends, unavailable_backends

    if importlib.util.find_spec("triton") is None:
        assert unavailable_backends("cpu") == {"triton": "triton not installed"}
        assert available_backends("cpu") == ["torch"]
    else:
        assert unavailable_backends("cpu") == {} and available_backends("cpu") == ["torch", "triton"]

"""The `zoo` command end to end on the offline tiny models (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from zoocli.cli import app
from cli_helpers import run, run_json, one_line_error

pytestmark = pytest.mark.usefixtures("offline_models")

REPO = Path(__file__).resolve().parent.parent
CAT = str(REPO / "sample_images" / "cat_chelsea.png")
CUP = str(REPO / "sample_images" / "coffee_cup.jpg")
FAST = ["--max-new-tokens", "3", "--estimator", "fd", "--m", "8"]


def test_methods_lists_every_registered_method():
    from zoocli import METHODS

    out = run("methods").stdout
    for name in METHODS:
        assert name in out
    rows = run_json("methods")
    assert {r["name"] for r in rows} == set(METHODS)
    assert all({"stage", "families", "paper", "summary"} <= set(r) for r in rows)


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_ask_json_has_documented_keys(model):
    d = run_json("ask", CUP, "What is in the cup?", "--model", model, "--keep", "5", *FAST)
    for key in ("model", "method", "keep", "n_visual_tokens", "kept_indices", "answer", "timings_ms"):
        assert key in d
    for key in ("vision", "selection", "prefill", "ttft", "decode", "e2e"):
        assert key in d["timings_ms"]
    assert d["method"] == "zoo" and d["keep"] == 5 and len(d["kept_indices"]) == 5
    assert d["meaningless"] is True


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_ask_renders_answer_grid_and_timings(model):
    out = run("ask", CAT, "What animal is this?", "--model", model, "--keep", "50%", *FAST).stdout
    assert "█" in out and "·" in out
    assert "prefill" in out and "time to first token" in out
    assert "meaningless" in out


def test_ask_overlay_is_at_least_the_image_size_plus_title_and_legend(tmp_path):
    out = tmp_path / "o.png"
    run("ask", CUP, "q?", "--model", "tiny-llava-next", "--keep", "10", "--overlay", out, *FAST)
    with Image.open(out) as im, Image.open(CUP) as src:  # NeXT: base image and crops side by side
        assert im.width >= 2 * src.width and im.height > src.height


def test_keep_more_than_tokens_is_clamped_with_a_warning():
    res = run("ask", CUP, "q?", "--model", "tiny-llava", "--keep", "100000", *FAST, "--json")
    d = json.loads(res.stdout)
    assert len(d["kept_indices"]) == d["n_visual_tokens"]
    assert "keeping all" in res.stderr


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["ask", "/no/such.jpg", "q"], 1, "no/such.jpg"),
        (["ask", __file__, "q"], 1, "not an image"),
        (["ask", CUP, "   "], 2, "question is empty"),
        (["ask", CUP, "q", "--keep", "0"], 2, "keep must be at least 1"),
        (["ask", CUP, "q", "--keep", "-5"], 2, "keep must be at least 1"),
        (["ask", CUP, "q", "--keep", "lots"], 2, "--keep"),
        (["ask", CUP, "q", "--m", "0"], 2, "--m must be at least 1"),
        (["ask", CUP, "q", "--h", "0"], 2, "--h must be a positive number"),
        (["ask", CUP, "q", "--h", "nan"], 2, "--h must be a positive number"),
        (["ask", CUP, "q", "--method", "fastestv"], 2, "known:"),
        (["ask", CUP, "q", "--model", "no-such-family-xyz"], 2, "unknown model 'no-such-family-xyz'"),
        (["ask", CUP, "q", "--model", "tiny-llava", "--dtype", "fp8"], 2, "fp8"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(args, code, needle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run(*args, code=code)
    one_line_error(res, needle)


def test_cuda_asked_but_absent(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = run("ask", CUP, "q", "--model", "tiny-llava", "--device", "cuda", code=1)
    one_line_error(res, "CUDA")


def test_corrupt_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(CUP).read_bytes()[:2000])
    res = run("ask", bad, "q", "--model", "tiny-llava", code=1)
    one_line_error(res, "broken.jpg")


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_score_json_and_heatmap(model, tmp_path):
    d = run_json("score", CUP, "--model", model, "--estimator", "fd", "--m", "8")
    assert d["n_visual_tokens"] == len(d["tokens"])
    t = d["tokens"][0]
    assert {"index", "scope", "row", "col", "sensitivity"} <= set(t)
    assert d["stats"]["min"] <= d["stats"]["median"] <= d["stats"]["max"]
    assert d["top"][0]["sensitivity"] == d["stats"]["max"]
    out = run("score", CUP, "--model", model, "--estimator", "fd", "--m", "8", "--overlay", tmp_path / "h.png").stdout
    assert "median" in out and "top" in out
    assert (tmp_path / "h.png").exists()


def test_score_vs_encoder_reports_spearman():
    d = run_json("score", CUP, "--model", "tiny-llava", "--estimator", "fd", "--m", "2", "--vs-encoder")
    assert -1 <= d["spearman_encoder_vs_projector"] <= 1
    assert len(d["encoder_sensitivity"]) == d["n_visual_tokens"]


def test_compare_table_json_and_sheet(tmp_path):
    d = run_json("compare", CUP, "q?", "--model", "tiny-llava-next", "--methods", "divprune,zoo",
                 "--keep", "12", *FAST)
    rows = {r["method"]: r for r in d["rows"]}
    assert list(rows) == ["none", "divprune", "zoo"]
    assert rows["none"]["kept"] == rows["none"]["total"]
    assert rows["zoo"]["kept"] == 12 and rows["zoo"]["jaccard_vs_zoo"] == 1.0
    for key in ("selection_ms", "prefill_ms", "e2e_ms", "speedup_e2e", "answer"):
        assert key in rows["divprune"]
    sheet = tmp_path / "sheet.png"
    out = run("compare", CUP, "q?", "--model", "tiny-llava", "--keep", "4", "--overlay", sheet,
              *FAST).stdout
    assert "Jaccard" in out and sheet.exists()


BENCH = ["bench", "--model", "tiny-llava", "--budgets", "8,4", "--methods", "zoo,divprune",
         "--images", CUP, "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--estimator", "fd", "--m", "4"]


def test_bench_rows_and_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = run_json(*BENCH, "--out", out)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("none", "all"), ("zoo", "8"), ("divprune", "8"), ("zoo", "4"), ("divprune", "4")]
    for r in rows[1:]:
        for key in ("speedup_prefill", "speedup_ttft", "speedup_e2e", "selection_share_of_ttft"):
            assert key in r
        for stage in ("vision", "selection", "prefill", "ttft", "decode", "e2e"):
            assert set(r[stage]) == {"median", "min", "max"}
        assert r["peak_memory_mb"] > 0 and r["est_tflops"]["total"] > 0
    assert len(out.read_text().splitlines()) == 5
    again = run_json(*BENCH, "--out", out)
    assert again == []  # every row was already there
    assert len(out.read_text().splitlines()) == 5


def test_bench_out_keeps_rows_when_a_later_row_fails(tmp_path, monkeypatch):
    import zoocli.bench as bench

    real = bench.run_method

    def flaky(adapter, enc, method, keep, **kw):
        if method == "divprune":
            raise RuntimeError("simulated crash")
        return real(adapter, enc, method, keep, **kw)

    monkeypatch.setattr(bench, "run_method", flaky)
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, [*BENCH, "--out", str(out)])
    assert res.exit_code != 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in kept] == [("none", "all"), ("zoo", "8")]


def test_config_file_supplies_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "zoo.yaml"
    cfg.write_text("model: tiny-llava\nkeep: 3\nmethod: divprune\nmax-new-tokens: 2\n")
    d = run_json("ask", CUP, "q", "--config", cfg)
    assert d["method"] == "divprune" and len(d["kept_indices"]) == 3
    d = run_json("ask", CUP, "q", "--config", cfg, "--keep", "5")
    assert len(d["kept_indices"]) == 5


@pytest.mark.parametrize("text,needle", [("kep: 3\n", "kep"), ("m: many\n", "'m'"),
                                          ("- a\n- b\n", "mapping")])
def test_config_file_errors_name_the_key(tmp_path, text, needle):
    cfg = tmp_path / "zoo.yaml"
    cfg.write_text(text)
    res = run("ask", CUP, "q", "--config", cfg, code=2)
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_cli_import_does_not_import_transformers():
    code = "import sys, zoocli.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_out_of_memory_is_one_line_with_advice(monkeypatch):
    import torch

    import zoocli.pipeline

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(zoocli.pipeline, "run_one", oom)
    res = run("ask", CUP, "q", "--model", "tiny-llava", code=1)
    one_line_error(res, "out of memory on the GPU", "Tried to allocate 20.00 GiB")
    assert "--m" not in res.stderr


def test_random_weights_too_big_for_memory_is_refused_up_front(monkeypatch):
    import zoocli.adapters

    monkeypatch.setattr(zoocli.adapters, "available_bytes", lambda device: 2**30)
    res = run("ask", CUP, "q", "--model", "llava-next", "--random-weights", "--device", "cpu",
              "--dtype", "bf16", code=1)
    one_line_error(res, "llava-next", "GiB", "free on cpu")


@pytest.mark.parametrize("args,needle", [
    (["ask", CUP, "q", "--m", "abc"], "--m"),
    (["ask", CUP], "Missing argument"),
    (["nosuchcommand"], "No such command"),
])
def test_entry_point_usage_errors_are_one_line(args, needle):
    res = subprocess.run([sys.executable, "-m", "zoocli", *args], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr


# ---- fast start (issue 12): no torch / transformers for help, version, listings, completion

_PROBE = """
import runpy, sys
sys.argv = ["zoo", *sys.argv[1:]]
try:
    runpy.run_module("zoocli", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code), file=sys.stderr)
"""


def _probe(*args, env=None):
    """Run `zoo ARGS` in a fresh interpreter; (stdout, heavy modules imported, exit code)."""
    import os

    res = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)
    tail = res.stderr.strip().splitlines()[-1]
    heavy, code = tail.split(" ")
    return res.stdout, heavy.removeprefix("HEAVY="), code.removeprefix("CODE=")


@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"], ["eval", "--help"], ["--version"],
                                  ["--show-completion", "bash"]])
def test_fast_start_imports_neither_torch_nor_transformers(args):
    out, heavy, code = _probe(*args)
    assert heavy == "" and code in ("0", "None"), (heavy, code)
    assert out.strip()


def test_version_is_the_package_metadata_version():
    from importlib.metadata import version

    out, _heavy, _code = _probe("--version")
    assert out.strip() == f"zoo {version('zoo-prune')}"


def test_shell_completion_completes_command_names():
    out, heavy, _code = _probe(env={"_ZOO_COMPLETE": "complete_bash", "COMP_WORDS": "zoo as",
                                    "COMP_CWORD": "1"})
    assert out.split() == ["ask"] and heavy == ""


@pytest.mark.parametrize("args", [["methods"], ["models"]])
def test_listings_import_neither_torch_nor_transformers(args):
    out, heavy, code = _probe(*args)
    assert heavy == "" and code in ("0", "None"), (heavy, code)


# ---- the method options are declared once: every command that runs a method takes them all

GROUP = {"--m", "--zoo-m", "--h", "--zoo-h", "--seed", "--estimator", "--rank", "--budget-scope"}


@pytest.mark.parametrize("command,scope", [("ask", True), ("compare", True), ("bench", True),
                                           ("eval", True), ("score", False)])
def test_every_method_command_takes_the_method_options(command, scope):
    import typer.main

    click_app = typer.main.get_command(app)
    flags = {o for p in click_app.commands[command].params for o in p.opts}
    want = GROUP if scope else GROUP - {"--budget-scope"}
    assert want <= flags and (scope or "--budget-scope" not in flags)


@pytest.mark.parametrize("command", [["ask", CUP, "q"], ["compare", CUP, "q"], ["bench"], ["eval"],
                                     ["score", CUP]])
def test_bad_estimator_is_refused_before_loading_by_every_command(command, monkeypatch):
    import zoocli.adapters

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --estimator was checked")

    monkeypatch.setattr(zoocli.adapters, "load_adapter", no_load)
    res = run(*command, "--model", "tiny-llava", "--estimator", "bogus", code=2)
    one_line_error(res, "--estimator")


def test_bad_budget_scope_is_refused_before_loading(monkeypatch):
    import zoocli.adapters

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --budget-scope was checked")

    monkeypatch.setattr(zoocli.adapters, "load_adapter", no_load)
    res = run("ask", CUP, "q", "--model", "tiny-llava", "--budget-scope", "tile", code=2)
    one_line_error(res, "--budget-scope", "crop, global")


# ---- progress off a terminal (issue 12): one plain line per finished unit on stderr

def test_bench_progress_lines_off_a_terminal_and_the_rerun_says_what_it_skips(tmp_path):
    out = tmp_path / "r.jsonl"
    res = run(*BENCH, "--out", out)
    lines = [ln for ln in res.stderr.splitlines() if " rows done " in ln]
    assert [ln.split(" rows done ")[0] for ln in lines] == [f"bench: {i}/5" for i in range(1, 6)]
    assert "(none @ all)" in lines[0] and "(divprune @ 4)" in lines[-1]
    assert all(ln.endswith(" s") for ln in lines)
    again = run(*BENCH, "--out", out, "--budgets", "8,2")
    assert "bench: skipping 2 of 4 rows already in" in again.stderr
    assert [ln.split(" rows done ")[0] for ln in again.stderr.splitlines()
            if " rows done " in ln] == ["bench: 1/3", "bench: 2/3", "bench: 3/3"]


def test_bench_warns_when_a_budget_keeps_every_token():
    res = run(*BENCH[:4], "16,4", *BENCH[5:], "--json")
    warning = [ln for ln in res.stderr.splitlines() if "--budgets 16" in ln]
    assert len(warning) == 1 and "keeps all 16 visual tokens" in warning[0]
    assert "--model small-llava" in warning[0]
    assert "--budgets 4" not in res.stderr


# ---- examples that work as written (issue 12)

def test_compare_and_score_without_an_image_use_the_shipped_sample_and_say_so():
    from zoocli.bench import SAMPLE_IMAGE, SAMPLE_QUESTION

    res = run("compare", "--methods", "divprune,zoo", "--model", "tiny-llava", "--keep", "4",
              "--max-new-tokens", "2", "--json")
    assert f"using the shipped sample {SAMPLE_IMAGE}" in res.stderr
    assert json.loads(res.stdout)["question"] == SAMPLE_QUESTION
    assert "compare: 1/9 runs done (none)" in res.stderr  # progress off a terminal: 3 methods x 3 runs
    assert "compare: 9/9 runs done (" in res.stderr
    res = run("score", "--model", "tiny-llava", "--json")
    assert SAMPLE_IMAGE in res.stderr and json.loads(res.stdout)["n_visual_tokens"] == 16
    one_line_error(run("compare", CUP, code=2), "QUESTION")


def test_ctrl_c_during_bench_exits_130_and_keeps_the_finished_rows(tmp_path, zoo_model_cache):
    """SIGINT while a bench runs on an --out that already holds finished rows: exit 130, one line,
    and the rows on disk are kept intact (bench interleaves its rows, so a run writes its own rows
    only in its last round: what an interrupt must never touch is what is already there)."""
    import os
    import signal
    import time

    home = tmp_path / "home"
    (home / ".cache" / "zoo").mkdir(parents=True)
    (home / ".cache" / "zoo" / "models").symlink_to(zoo_model_cache)  # the session's offline models
    out = tmp_path / "r.jsonl"
    run(*BENCH, "--out", out)  # the finished rows
    before = out.read_text()
    assert before.count("\n") == 5
    args = [*BENCH, "--repeats", "30", "--out", str(out)]  # other settings: 5 rows of 30 runs to go
    proc = subprocess.Popen([sys.executable, "-m", "zoocli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": str(home)})
    lock = out.with_name(out.name + ".lock")
    try:
        while proc.poll() is None and not lock.exists():  # the run holds --out
            time.sleep(0.05)
        time.sleep(2.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted"
    assert out.read_text() == before and not lock.exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and rows[0]["method"] == "none"


@pytest.mark.parametrize("args,flag", [(["ask", CUP, "q", "--keep", "0"], "--keep 0"),
                                       (["bench", "--budgets", "64,0"], "--budgets 0")])
def test_a_zero_budget_names_its_flag(args, flag):
    """Regression (issue 12): --keep 0 and --budgets 0 both said "keep must be at least 1"."""
    one_line_error(run(*args, code=2), flag, "keep must be at least 1")

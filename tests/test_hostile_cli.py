"""Issue 11, the CLI side: hostile command lines, --config files and output paths, and the process
edges (Ctrl-C while importing, a closed stdout, a reader that goes away) give one line and a
non-zero exit, never a traceback or a hang; numbers are bounded with the range in the message.

Everything hostile is built in ``tmp_path``; subprocesses run ``sys.executable -m zoocli`` from the
repository root (so they import this checkout) with HOME set to ``tmp_path`` (no real cache)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import one_line_error, run
from zoocli.cli.common import question_text

ROOT = Path(__file__).resolve().parents[1]
CUP = str(ROOT / "sample_images" / "cat_chelsea.png")
BIG = "9" * 5000


def zoo(*args, tmp_path, timeout=120, **kw):
    """`python -m zoocli ARGS` in a real process; (returncode, stdout, stderr)."""
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "zoocli", *map(str, args)], cwd=ROOT, env=env,
                       capture_output="stdout" not in kw, timeout=timeout, **kw)
    return p.returncode, p.stdout, p.stderr


def main_in_process(args, capsys, monkeypatch):
    """``zoocli.cli.main`` (the real entry: one-line usage errors) in-process: (code, out, err)."""
    from zoocli.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["zoo", *map(str, args)])
    with pytest.raises(SystemExit) as ex:
        main()
    out = capsys.readouterr()
    return ex.value.code, out.out, out.err


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], err


# --------------------------------------------------------------------------- Rich markup


def test_markup_in_an_image_name_is_text():
    res = run("ask", "[/x].jpg", "q", code=1)
    one_line_error(res, "[/x].jpg")


def test_markup_in_an_unknown_option_is_text(capsys, monkeypatch):
    code, _, err = main_in_process(["methods", "--x[/y]"], capsys, monkeypatch)
    assert code == 2
    assert_one_line(err, "--x[/y]")


def test_error_line_escapes_control_characters_and_shortens_long_words():
    from zoocli.cli.common import one_line

    assert one_line("no file a\nb.jpg") == "no file a\\nb.jpg"
    long = one_line("image '" + "a" * 10_000 + ".jpg' is missing")
    assert "\n" not in long and "(10006 characters)" in long and long.endswith("is missing")
    assert len(long) < 300


def test_table_cells_are_not_markup(capsys):
    from rich.table import Table

    from zoocli.cli.common import console

    t = Table()
    t.add_column("[/y]")
    t.add_row("[/x].jpg")
    console.print(t)
    assert "[/x].jpg" in capsys.readouterr().out


# --------------------------------------------------------------------------- numbers


BOUNDS = [
    (["ask", CUP, "q", "--m", "99999999999999999999"], "--m", "at most 65536"),
    (["ask", CUP, "q", "--m", "-3"], "--m", "at least 1"),
    (["ask", CUP, "q", "--h", "1e308"], "--h", "[0.0001, 1]"),
    (["ask", CUP, "q", "--h", "1e-30"], "--h", "[0.0001, 1]"),
    (["ask", CUP, "q", "--h", "inf"], "--h", "[0.0001, 1]"),
    (["ask", CUP, "q", "--rank", "99999999999999999999"], "--rank", "at most 65536"),
    (["ask", CUP, "q", "--seed", str(2**64)], "--seed", str(2**64 - 1)),
    (["ask", CUP, "q", "--max-new-tokens", "99999999999"], "--max-new-tokens", "at most 32768"),
    (["compare", CUP, "q", "--max-new-tokens", "0"], "--max-new-tokens", "at least 1"),
    (["score", CUP, "--top", "-1"], "--top", "at least 0"),
    (["score", CUP, "--m", "70000"], "--m", "at most 65536"),
    (["bench", "--repeats", "0"], "--repeats", "at least 1"),
    (["bench", "--warmup", "99999999999"], "--warmup", "at most 100000"),
    (["bench", "--max-new-tokens", "99999999999"], "--max-new-tokens", "at most 32768"),
    (["eval", "--batch-size", "99999999999"], "--batch-size", "at most 4096"),
    (["eval", "--h", "5"], "--h", "[0.0001, 1]"),
    (["bench-kernel", "--n", "0"], "--n", "at least 1"),
    (["bench-kernel", "--m", "99999999999999999999"], "--m", "at most 65536"),
    (["ask", CUP, "q", "--method", "zoo:m=99999999999999999999"], "zoo:m=", "at most 65536"),
    (["ask", CUP, "q", "--method", "zoo:h=1e-30"], "zoo:h=", "[0.0001, 1]"),
    (["compare", CUP, "q", "--methods", "divprune,zoo:h=1e308"], "zoo:h=", "[0.0001, 1]"),
    (["ask", CUP, "q", "--keep", BIG], "--keep", "(5000 digits)"),
    (["bench", "--budgets", f"64,{BIG}"], "--budgets", "(5000 digits)"),
]


@pytest.mark.parametrize("args,flag,needle", BOUNDS, ids=[" ".join(b[0])[:50] for b in BOUNDS])
def test_numbers_out_of_range_are_one_line_naming_flag_and_range(args, flag, needle):
    res = run(*args, code=2)  # usage error: nothing was loaded
    one_line_error(res, flag, needle)


def test_h_bounds_hold_in_the_library_too():
    from zoocli.errors import UsageError
    from zoocli.sensitivity import H_MAX, H_MIN, M_MAX, check_options

    check_options(m=M_MAX, h=H_MIN, estimator="fd")
    check_options(m=1, h=H_MAX, estimator="fd")
    for bad in ({"m": M_MAX + 1}, {"h": H_MIN / 2}, {"h": H_MAX * 2}):
        with pytest.raises(UsageError, match="must be"):  # the range, whatever the estimator
            check_options(**bad)
        with pytest.raises(UsageError, match="must be"):
            check_options(**bad, estimator="fd")


def test_a_5000_digit_integer_flag_is_one_line(capsys, monkeypatch):
    code, _, err = main_in_process(["ask", CUP, "q", "--m", BIG], capsys, monkeypatch)
    assert code == 2
    assert_one_line(err, "--m")
    assert len(err) < 400  # the 5000 digits are not echoed in full


def test_a_10000_character_image_path_is_one_short_line(tmp_path):
    name = str(tmp_path / ("a" * 10_000 + ".jpg"))
    for args in (["ask", name, "q"], ["bench", "--images", name], ["score", name]):
        res = run(*args, code=1)
        one_line_error(res, "aaaa")
        assert len(res.stderr) < 600, res.stderr


# --------------------------------------------------------------------------- --config


def _config_error(tmp_path, capsys, monkeypatch, text: bytes, *needles, command=("ask", CUP, "q")):
    p = tmp_path / "zoo.yaml"
    p.write_bytes(text)
    code, _, err = main_in_process([*command, "--config", p], capsys, monkeypatch)
    assert code == 2
    assert_one_line(err, "--config", *needles)


def test_config_nested_100k_deep_is_one_line(tmp_path, capsys, monkeypatch):
    deep = b"m: " + b"[" * 100_000 + b"]" * 100_000 + b"\n"
    _config_error(tmp_path, capsys, monkeypatch, deep, "nested too deeply")


def test_config_huge_file_is_refused_unparsed(tmp_path, capsys, monkeypatch):
    _config_error(tmp_path, capsys, monkeypatch, b"# " + b"x" * (2 << 20) + b"\n", "over 1 MiB")


def test_config_5000_digit_number_is_one_line(tmp_path, capsys, monkeypatch):
    _config_error(tmp_path, capsys, monkeypatch, b"m: " + BIG.encode() + b"\n", "4300 digits")


def test_config_unhashable_key_says_what_and_where(tmp_path, capsys, monkeypatch):
    _config_error(tmp_path, capsys, monkeypatch, b"? [a]\n: 1\n", "unhashable key", "line 1")


def test_config_not_utf8_is_one_line(tmp_path, capsys, monkeypatch):
    _config_error(tmp_path, capsys, monkeypatch, b"model: caf\xe9\n", "not UTF-8")


def test_config_fifo_is_refused_without_opening(tmp_path):
    fifo = tmp_path / "zoo.yaml"
    os.mkfifo(fifo)
    code, _, err = zoo("ask", CUP, "q", "--config", fifo, tmp_path=tmp_path, timeout=60)
    assert code == 2
    assert_one_line(err.decode(), "--config", "FIFO")


def test_config_device_is_refused(tmp_path, capsys, monkeypatch):
    dev = tmp_path / "zero"
    try:  # a fake /dev/zero (char device 1:5) inside tmp_path; reading it would never end
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    code, _, err = main_in_process(["ask", CUP, "q", "--config", dev], capsys, monkeypatch)
    assert code == 2
    assert_one_line(err, "--config", "character device")


def test_config_out_of_range_values_are_refused_like_flags(tmp_path):
    for text, needle in (("m: 99999999999999999999", "at most 65536"), ("h: 1.0e-30", "[0.0001, 1]"),
                         ("max-new-tokens: 0", "at least 1")):
        p = tmp_path / "c.yaml"
        p.write_text(text + "\n")
        one_line_error(run("ask", CUP, "q", "--config", p, code=2), needle)


def test_config_yaml_lists_for_list_options(tmp_path, capsys, monkeypatch):
    """`methods: [zoo, divprune]` and `budgets: [192, 128]` are the comma-separated flags."""
    import importlib

    from zoocli.errors import UsageError

    cli_bench = importlib.import_module("zoocli.cli.bench")  # the module (the package exports `bench`)

    seen = {}

    def stop(names, budgets, *rest):  # the first thing bench does with the parsed lists
        seen.update(names=names, budgets=budgets)
        raise UsageError("stop here")

    monkeypatch.setattr(cli_bench, "_check_plan", stop)
    p = tmp_path / "zoo.yaml"
    p.write_text("methods: [zoo, 'zoo:estimator=jvp', divprune]\nbudgets: [192, 11%, 64]\n")
    code, _, err = main_in_process(["bench", "--config", p], capsys, monkeypatch)
    assert code == 2
    assert_one_line(err, "stop here")
    assert seen == {"names": ["zoo", "zoo:estimator=jvp", "divprune"], "budgets": ["192", "11%", "64"]}
    p.write_text("methods: [zoo, [divprune]]\n")
    code, _, err = main_in_process(["bench", "--config", p], capsys, monkeypatch)
    assert code == 2
    assert_one_line(err, "'methods'", "list of single values")
    p.write_text("model: [a, b]\n")  # only the list options take a list
    code, _, err = main_in_process(["bench", "--config", p], capsys, monkeypatch)
    assert_one_line(err, "'model'", "single value")


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=25)
_yaml_docs = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["m", "h", "seed", "keep", "method", "model", "rank", "x", "json",
                                     "max-new-tokens", "estimator", "budget-scope", "overlay"]),
                    _yaml_values, max_size=5).map(lambda d: yaml.safe_dump(d).encode()),
    _yaml_values.map(lambda v: yaml.safe_dump(v).encode()),
    st.tuples(st.integers(1, 50_000), st.sampled_from(["[", "{a: "])).map(
        lambda t: (t[1] * t[0]).encode()),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=_yaml_docs)
def test_any_config_gives_one_line_and_a_failure(tmp_path, capsys, monkeypatch, doc):
    """Random bytes and random nested YAML as --config: always one line and a non-zero exit (the
    image does not exist, so even a valid configuration ends in an error, before any model)."""
    p = tmp_path / "c.yaml"
    p.write_bytes(doc)
    code, _, err = main_in_process(["ask", tmp_path / "no-such.jpg", "q", "--config", p],
                                   capsys, monkeypatch)
    assert code not in (0, None)
    assert_one_line(err)


# --------------------------------------------------------------------------- images, questions


def test_question_bytes_that_are_not_utf8_become_replacement_characters():
    q = b"caf\xe9 ?".decode("utf-8", "surrogateescape")  # what argv gives for a Latin-1 question
    assert question_text(q) == "caf\ufffd ?"
    assert question_text("  <image> [/x] ") == "<image> [/x]"  # token- and markup-like text stays


def test_extreme_aspect_is_refused_naming_the_file(tmp_path, offline_models, rand_image):
    wide = tmp_path / "strip.png"
    rand_image(1000, 10).save(wide)  # 100:1, over LLaVA-1.5's 20:1
    for args in (["ask", wide, "q"], ["compare", wide, "q"], ["score", wide],
                 ["bench", "--images", wide, "--repeats", "1", "--warmup", "0"]):
        extra = [] if args[0] == "score" else ["--max-new-tokens", "2"]
        res = run(*args, "--model", "tiny-llava", *extra, code=1)
        one_line_error(res, "strip.png", "20:1")


def test_eval_names_the_image_with_an_extreme_aspect(tmp_path, offline_models, rand_image):
    rand_image(1000, 10).save(tmp_path / "strip.png")
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": "strip.png", "question": "q?", "answer": "yes"}) + "\n")
    res = run("eval", data, "--methods", "zoo", "--budgets", "4", "--model", "tiny-llava",
              "--max-new-tokens", "2", "--out", tmp_path / "o.jsonl", code=1)
    one_line_error(res, "strip.png", "20:1")


def test_allow_outside_root_is_wired(tmp_path, rand_image):
    (tmp_path / "outside").mkdir()
    (tmp_path / "data").mkdir()
    rand_image(32, 32).save(tmp_path / "outside" / "secret.png")
    data = tmp_path / "data" / "q.jsonl"
    data.write_text(json.dumps({"image": "../outside/secret.png", "question": "q?", "answer": "a"}) + "\n")
    common = ["--methods", "zoo", "--budgets", "4", "--model", str(tmp_path / "no-such-model"),
              "--out", tmp_path / "o.jsonl"]
    res = run("eval", data, *common, code=1)
    one_line_error(res, "line 1", "secret.png", "outside", "--allow-outside-root")
    ok = run("eval", data, "--allow-outside-root", *common, code=1)
    one_line_error(ok, "no-such-model")  # the data file passed: the model is what failed next


# --------------------------------------------------------------------------- output files


def test_bench_out_fifo_is_refused_before_anything_and_never_opened(tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    code, _, err = zoo("bench", "--out", fifo, "--model", "tiny-llava", tmp_path=tmp_path, timeout=120)
    assert code == 1
    assert_one_line(err.decode(), "rows.jsonl", "FIFO")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "rows.jsonl.lock").exists()


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_foreign_out_is_refused_before_the_model_loads_and_left_alone(tmp_path, command):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes, not zoo's")
    res = run(command, "--out", notes, "--model", str(tmp_path / "no-such-model"), code=1)
    one_line_error(res, "notes.txt", "not a zoo JSON Lines file")  # not the model's error: before it
    assert notes.read_bytes() == b"my notes, not zoo's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_out_in_use_is_refused_naming_the_holder(tmp_path, command):
    out = tmp_path / "run.jsonl"
    lock = tmp_path / "run.jsonl.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:  # another writer's lock (outfile.output_lock's sidecar, flock'ed, its PID inside)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        res = run(command, "--out", out, "--model", str(tmp_path / "no-such-model"), code=1)
        one_line_error(res, "run.jsonl", "in use", "4242")
    finally:
        os.close(fd)
    assert not out.exists()


def test_bench_out_lock_is_released_after_the_run(tmp_path, offline_models):
    out = tmp_path / "rows.jsonl"
    args = ["bench", "--model", "tiny-llava", "--methods", "divprune", "--budgets", "4",
            "--images", CUP, "--repeats", "1", "--warmup", "0", "--max-new-tokens", "1", "--out", out]
    run(*args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and not (tmp_path / "rows.jsonl.lock").exists()
    run(*args)  # a rerun finds every row done and appends nothing
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


# --------------------------------------------------------------------------- the process


def test_ctrl_c_while_the_cli_imports_is_one_line_and_130(tmp_path):
    """A real SIGINT, delivered while each of these modules is being imported (deterministic: an
    import hook sends it), is `error: interrupted` and exit code 130."""
    child = (
        "import os, runpy, signal, sys\n"
        "target = sys.argv.pop(1)\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target_=None):\n"
        "        if name == target:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "sys.argv[0] = 'zoo'\n"
        "runpy.run_module('zoocli', run_name='__main__', alter_sys=True)\n"
    )
    for module in ("typer", "rich.console", "zoocli.cli.eval", "torch"):
        p = subprocess.run([sys.executable, "-c", child, module, "bench-kernel", "--n", "1", "--m", "1",
                            "--repeats", "1", "--warmup", "0"], cwd=ROOT, capture_output=True,
                           timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        assert p.returncode == 130, (module, p.stderr.decode())
        assert p.stderr.decode().strip() == "error: interrupted", (module, p.stderr.decode())


def test_ctrl_c_right_after_start_is_one_line_and_130(tmp_path):
    """SIGINT from outside as soon as the CLI's imports have begun (the first import after the
    entry point's guard is typer's: `-X importtime` tells when it is done)."""
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "zoocli", "ask", CUP, "q",
                          "--model", "tiny-llava"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        for line in p.stderr:
            if line.split(b"|")[-1].strip() == b"typer":
                break
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [ln for ln in err.decode().splitlines() if not ln.startswith("import time:")]
    assert p.returncode == 130, err.decode()[-2000:]
    assert lines == ["error: interrupted"], lines


def test_closed_stdout_is_a_clean_exit(tmp_path):
    """`zoo methods --json >&-`: fd 1 really closed in the child; exit 0 and nothing on stderr."""
    for args in (["methods", "--json"], ["models"], ["--version"]):
        code, _, err = zoo(*args, tmp_path=tmp_path, stdout=None, stderr=subprocess.PIPE,
                           preexec_fn=lambda: os.close(1))
        assert (code, err) == (0, b""), (args, err)


def test_closed_stdout_never_lends_fd_1_to_a_file(tmp_path):
    """With fd 1 closed at start, the next file opened would get it and stdout would be written
    into it; std_streams puts the null device there first."""
    child = ("import os, sys\n"
             "from zoocli.process import std_streams\n"
             "std_streams()\n"
             "f = open(sys.argv[1], 'w')\n"
             "print('to stdout')\n"
             "sys.stdout.flush()\n"
             "sys.stderr.write(str(f.fileno()))\n")
    target = tmp_path / "user-file.txt"
    p = subprocess.run([sys.executable, "-c", child, str(target)], cwd=ROOT, stderr=subprocess.PIPE,
                       preexec_fn=lambda: os.close(1), timeout=60)
    assert p.returncode == 0 and int(p.stderr) > 2
    assert target.read_text() == ""


@pytest.mark.parametrize("args", [["methods"], ["methods", "--json"], ["models"]])
def test_reader_gone_is_a_quiet_exit(tmp_path, args):
    """`zoo methods | head -0`: the pipe's reader is closed before zoo writes."""
    r, w = os.pipe()
    os.close(r)
    try:
        code, _, err = zoo(*args, tmp_path=tmp_path, stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    assert code == 141 and err == b"", err


def test_rows_with_non_utf8_names_are_written_and_read_back(tmp_path):
    """A file name with a byte that is not UTF-8 (argv gives a lone surrogate) in a bench row: the
    row is written as valid JSON (the \\uXXXX escape) and reads back equal, so a rerun skips it."""
    from zoocli.bench import append_row, done_keys
    from zoocli.outfile import BENCH_KEYS, check_jsonl

    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    row = {"method": "none", "budget": "all", "key": {"images": [name], "method": "none"}}
    out = tmp_path / "rows.jsonl"
    append_row(out, row)
    assert check_jsonl(out, BENCH_KEYS) is None
    assert json.loads(out.read_bytes().decode("utf-8")) == row
    assert len(done_keys(out)) == 1

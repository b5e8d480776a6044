"""Issue 25, writes, keys and the process: one rule for every file zoo writes (--out, --overlay,
lmms-eval stats, locks, torchrun shards), unique keys and rows, offline means offline, the image
folder re-checked when an image is opened, SIGTERM like Ctrl-C. Every case: one `error:` line, a
non-zero exit, no traceback, no hang, nothing of the user's lost or replaced.

Everything is built in ``tmp_path``; subprocesses run ``sys.executable -m zoocli`` from the
repository root with HOME set to ``tmp_path``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import one_line_error, run
from zoocli.errors import ZooError
from zoocli.evaluation import RecordWriter, load_samples, read_records, shard_path
from zoocli.evaluation.store import SHARD_FIELD, check_shard, is_shard_of, zoo_shards
from zoocli.outfile import (
    STATS_HEADS, STATS_KEYS, is_zoo_png, output_lock, save_png, write_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "sample_images"
CUP = IMAGES / "cat_chelsea.png"
ENV = {"HF_HUB_OFFLINE": "1"}


def zoo(*args, tmp_path, timeout=120, env=None):
    """`python -m zoocli ARGS` in a real process: (returncode, stdout, stderr as text)."""
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), **ENV, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "zoocli", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, timeout=timeout, text=True)
    return p.returncode, p.stdout, p.stderr


def assert_one_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], err


def rec(i, **extra):
    return {"dataset": "d", "id": str(i), "method": "zoo", "budget": 4, "score": 1.0, **extra}


def files(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones too) and its bytes: nothing added, lost or changed."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- --overlay


@pytest.fixture
def photo(tmp_path) -> Path:
    p = tmp_path / "photo.png"
    p.write_bytes(CUP.read_bytes())
    return p


@pytest.mark.parametrize("command", ["score", "ask", "compare"])
def test_overlay_onto_its_own_input_is_refused_and_the_photo_kept(tmp_path, photo, command):
    before = files(tmp_path)
    for target in (photo, tmp_path / "link.png", tmp_path / "hard.png"):
        if target.name == "link.png" and not target.exists():
            target.symlink_to(photo)
        if target.name == "hard.png" and not target.exists():
            os.link(photo, target)
        res = run(command, photo, "q", "--model", "tiny-llava", "--overlay", target, code=1)
        one_line_error(res, "--overlay", "is the input file", "never writes over its input")
    assert photo.read_bytes() == before["photo.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".lock", ".zoo-tmp"))]


@pytest.mark.parametrize("content", [b"my notes", CUP.read_bytes()], ids=["notes.txt", "a PNG of the user's"])
def test_overlay_onto_a_file_that_is_not_zoos_is_refused(tmp_path, photo, content):
    other = tmp_path / "other.txt"
    other.write_bytes(content)
    before = files(tmp_path)
    res = run("score", photo, "q", "--model", "tiny-llava", "--overlay", other, code=1)
    one_line_error(res, "other.txt", "is not a PNG that zoo wrote")
    assert files(tmp_path) == before


def test_overlay_fifo_is_one_line_and_no_hang(tmp_path, photo):
    fifo = tmp_path / "heat.png"
    os.mkfifo(fifo)
    code, _, err = zoo("score", photo, "q", "--model", "tiny-llava", "--overlay", fifo, tmp_path=tmp_path)
    assert code == 1
    assert_one_error(err, "heat.png", "FIFO")
    assert not (tmp_path / "heat.png.lock").exists()


def test_save_png_signs_rewrites_its_own_and_keeps_a_symlink(tmp_path):
    im = Image.new("RGB", (8, 6), (10, 20, 30))
    out = tmp_path / "o.png"
    out.write_bytes(b"")  # an empty file is fine (mktemp)
    save_png(im, out)
    assert is_zoo_png(out) and Image.open(out).info["Software"].startswith("zoo ")
    save_png(Image.new("RGB", (4, 4)), out)  # zoo's own: replaced
    assert Image.open(out).size == (4, 4)
    real = tmp_path / "real" / "r.png"
    real.parent.mkdir()
    link = tmp_path / "l.png"
    link.symlink_to(real)
    save_png(im, link)
    assert link.is_symlink() and is_zoo_png(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "o.png", "real"]  # no temp, no lock
    assert not is_zoo_png(CUP)


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import zoocli.outfile as outfile

    p = tmp_path / "o.png"
    save_png(Image.new("RGB", (8, 8)), p)
    before = p.read_bytes()

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outfile.os, "replace", no_space)
    with pytest.raises(ZooError, match="disk full.*nothing was changed"):
        write_atomic(p, b"new bytes", "--overlay")
    assert p.read_bytes() == before and [q.name for q in tmp_path.iterdir()] == ["o.png"]


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_out_that_is_an_input_is_refused(tmp_path, command):
    """--out naming the question file, the --config file or an image: refused before anything
    loads, whatever the file holds."""
    q = _question_file(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-new-tokens: 1\n")
    before = files(tmp_path)
    inputs = {"eval": [q, "--image-root", IMAGES, "--config", cfg], "bench": ["--images", CUP, "--config", cfg]}[command]
    for target in ({"eval": q, "bench": CUP}[command], cfg):
        res = run(command, *inputs, "--model", str(tmp_path / "no-such-model"), "--out", target, code=1)
        one_line_error(res, "--out", "is the input file")
    assert files(tmp_path) == before


# --------------------------------------------------------------------------- lock files


def test_a_users_own_lock_file_is_neither_truncated_nor_deleted(tmp_path):
    out = tmp_path / "run.jsonl"
    lock = tmp_path / "run.jsonl.lock"
    lock.write_bytes(b"my own notes about this run\n")
    before = files(tmp_path)
    with pytest.raises(ZooError, match="is not a zoo lock file") as e:
        RecordWriter(out)
    assert "\n" not in str(e.value)
    res = run("eval", "--out", out, "--model", str(tmp_path / "no-such-model"), code=1)
    one_line_error(res, "run.jsonl.lock", "not a zoo lock file")
    assert files(tmp_path) == before


def test_a_lock_that_is_a_fifo_or_a_link_is_refused_untouched(tmp_path):
    out = tmp_path / "run.jsonl"
    os.mkfifo(tmp_path / "run.jsonl.lock")
    with pytest.raises(ZooError, match="FIFO"):
        RecordWriter(out)
    os.unlink(tmp_path / "run.jsonl.lock")
    (tmp_path / "precious").write_bytes(b"x")
    (tmp_path / "run.jsonl.lock").symlink_to(tmp_path / "precious")
    with pytest.raises(ZooError, match="symbolic link"):
        RecordWriter(out)
    assert (tmp_path / "precious").read_bytes() == b"x" and not out.exists()


def test_a_stale_zoo_lock_is_taken_over_and_removed(tmp_path):
    out = tmp_path / "run.jsonl"
    (tmp_path / "run.jsonl.lock").write_bytes(b"zoo output lock\n999999\n")  # a killed run's
    with RecordWriter(out) as w:
        w.write(rec(1))
    assert not (tmp_path / "run.jsonl.lock").exists()
    with output_lock(out):
        assert (tmp_path / "run.jsonl.lock").read_bytes() == f"zoo output lock\n{os.getpid()}\n".encode()


# --------------------------------------------------------------------------- lmms-eval stats


@pytest.fixture
def lmms_model(monkeypatch):
    """``zoocli.lmms_eval_model``: the real one with lmms-eval installed, else imported over a
    stand-in for lmms-eval's base class (the stats file helpers need nothing else of it)."""
    if importlib.util.find_spec("lmms_eval") is None:
        names = ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model")
        for name in names:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["lmms_eval.api.model"].lmms = type("lmms", (), {})
        monkeypatch.delitem(sys.modules, "zoocli.lmms_eval_model", raising=False)
        yield importlib.import_module("zoocli.lmms_eval_model")
        sys.modules.pop("zoocli.lmms_eval_model", None)
    else:
        yield importlib.import_module("zoocli.lmms_eval_model")


def test_stats_file_follows_the_rule(tmp_path, lmms_model):
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"a": 1}\n')
    fifo = tmp_path / "stats.fifo"
    os.mkfifo(fifo)
    before = files(tmp_path)
    for path, needle in ((notes, "not a zoo JSON Lines file"), (fifo, "FIFO")):
        for call in (lmms_model._check_stats, lmms_model._open_stats):
            with pytest.raises(ZooError, match=needle) as e:
                call(str(path), 0, 1)
            assert "stats" in str(e.value) and "\n" not in str(e.value)
    assert files(tmp_path) == before
    row = {"task": "t", "split": "s", "doc_id": 0, "kept_tokens": 4, "n_visual_tokens": 16}
    for _run in range(2):  # zoo's own stats: appended to, never truncated
        with lmms_model._open_stats(str(tmp_path / "stats.jsonl"), 0, 1) as out:
            out.append(row)
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 2
    assert lmms_model._stats_path(str(tmp_path / "stats.jsonl"), 1, 2).name == "stats.rank1.jsonl"
    assert STATS_HEADS[0].startswith(b'{"task"') and set(STATS_KEYS) <= set(row)


# --------------------------------------------------------------------------- shards


def _question_file(tmp_path: Path, n: int = 1) -> Path:
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"id": f"s{i}", "image": "cat_chelsea.png", "question": "What is it?",
                                     "answer": "cat"}) + "\n" for i in range(n)))
    return q


EVAL_FAST = ["--image-root", IMAGES, "--methods", "divprune", "--budgets", "4", "--batch-size", "2",
             "--max-new-tokens", "1", "--model", "tiny-llava"]


def test_a_users_rank_named_file_is_never_merged_nor_deleted(tmp_path, offline_models):
    """`--out results.jsonl` next to the user's own `results.rank64.jsonl` (another run's --out):
    a single-process run leaves it alone; a torchrun rank 64 would refuse to write into it."""
    mine = tmp_path / "results.rank64.jsonl"
    with RecordWriter(mine) as w:
        w.write(rec("x"))
    before = mine.read_bytes()
    out = tmp_path / "results.jsonl"
    run("eval", _question_file(tmp_path), *EVAL_FAST, "--out", out)
    assert mine.read_bytes() == before
    assert {r["id"] for r in read_records(out)} == {"s0"}
    assert zoo_shards(out) == [] and not is_shard_of(mine, out, 64)
    with pytest.raises(ZooError, match="not a shard zoo wrote") as e:
        check_shard(out, 64)
    assert "\n" not in str(e.value)
    with pytest.raises(ZooError, match="not a shard zoo wrote"):
        RecordWriter(shard=(out, 64, 128))
    assert mine.read_bytes() == before


def test_signed_shards_of_a_crashed_torchrun_run_are_resumed_merged_and_removed(tmp_path, offline_models):
    out = tmp_path / "results.jsonl"
    q = _question_file(tmp_path, 2)
    run("eval", q, *EVAL_FAST, "--out", tmp_path / "full.jsonl")
    full = list(read_records(tmp_path / "full.jsonl"))
    shard_rec = next(r for r in full if r["id"] == "s1")
    with RecordWriter(shard=(out, 1, 2)) as w:  # rank 1 of a world of 2 finished one record
        w.write(shard_rec)
    p = shard_path(out, 1)
    assert is_shard_of(p, out, 1) and json.loads(p.read_text())[SHARD_FIELD] == {
        "out": "results.jsonl", "rank": 1, "world": 2}
    res = run("eval", q, *EVAL_FAST, "--out", out)
    assert "already in" in res.stderr  # the shard's record was resumed, not redone
    assert not p.exists()
    merged = list(read_records(out))
    assert sorted((r["id"], r["method"]) for r in merged) == sorted((r["id"], r["method"]) for r in full)
    assert all(SHARD_FIELD not in r for r in merged)


def test_a_shard_writer_with_nothing_to_write_leaves_no_file(tmp_path):
    with RecordWriter(shard=(tmp_path / "r.jsonl", 3, 4)):
        pass
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- keys and rows


def test_question_ids_never_collide(tmp_path):
    q = tmp_path / "q.jsonl"
    rows = [{"id": i, "image": "cat_chelsea.png", "question": f"q{n}", "answer": "a"}
            for n, i in enumerate(["1", "1", "1#1", "1#2", 2, "2"])]
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_samples(q, image_root=IMAGES)
    ids = [s.id for s in samples]
    assert len(set(ids)) == len(ids) == 6
    assert ids[2:4] == ["1#1", "1#2"]  # unique ids keep their spelling
    assert [s.source_id for s in samples] == ["1", "1", "1#1", "1#2", 2, "2"]
    assert ids == [s.id for s in load_samples(q, image_root=IMAGES)]  # stable


def test_bench_plan_is_deduplicated_with_a_note(tmp_path, offline_models):
    out = tmp_path / "rows.jsonl"
    res = run("bench", "--model", "tiny-llava", "--methods", "divprune,divprune", "--budgets", "4,4, 4",
              "--images", CUP, "--repeats", "1", "--warmup", "0", "--max-new-tokens", "1", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["method"], r["budget"]) for r in rows) == [("divprune", "4"), ("none", "all")]
    notes = [ln for ln in res.stderr.splitlines() if "listed more than once" in ln]
    assert notes == ["--methods: divprune listed more than once; each is run once",
                     "--budgets: 4 listed more than once; each is run once"]


def test_eval_plan_is_deduplicated_with_a_note(tmp_path, offline_models):
    out = tmp_path / "o.jsonl"
    res = run("eval", _question_file(tmp_path), "--image-root", IMAGES, "--methods", "divprune,divprune",
              "--budgets", "4,4", "--max-new-tokens", "1", "--model", "tiny-llava", "--out", out)
    assert sorted(r["method"] for r in read_records(out)) == ["divprune", "none"]
    assert "--budgets: 4 listed more than once" in res.stderr


@pytest.mark.parametrize("text, needle", [
    ("keep: 8\nmax-new-tokens: 3\nkeep: 9\n", "key 'keep' is given twice (first on line 1)"),
    ("{keep: 8, keep: 8}\n", "key 'keep' is given twice"),
    ("max-new-tokens: 3\nmax_new_tokens: 4\n", "'max-new-tokens' and 'max_new_tokens' are the same option"),
    ("json: true\njson_out: false\n", "are the same option"),
])
def test_config_duplicate_keys_and_two_spellings_are_errors(tmp_path, text, needle, capsys, monkeypatch):
    from zoocli.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["zoo", "ask", str(CUP), "q", "--config", str(cfg)])
    with pytest.raises(SystemExit) as ex:
        main()  # the real entry: click's usage errors as one line
    assert ex.value.code == 2
    assert_one_error(capsys.readouterr().err, needle, "--config")


# --------------------------------------------------------------------------- offline


SITE = """
import os, socket
def _forbidden(*args, **kwargs):
    with open(os.environ["ZOO_TEST_MARK"], "a") as f:
        f.write(repr(args[1:] or args) + "\\n")
    raise OSError(101, "network forbidden by the test")
socket.socket.connect = _forbidden  # any connection, and any name lookup before one
socket.socket.connect_ex = _forbidden
socket.getaddrinfo = _forbidden
socket.create_connection = _forbidden
"""


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", None])
def test_offline_opens_no_connection_for_an_unknown_model(tmp_path, switch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    mark = tmp_path / "connections.txt"
    env = {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "ZOO_TEST_MARK": str(mark),
           "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")}
    if switch:
        env[switch] = "1"
    code, _, err = zoo("ask", CUP, "q", "--model", "no-such-org/no-such-model", tmp_path=tmp_path, env=env)
    assert code == 1
    assert_one_error(err, "no-such-org/no-such-model")
    if switch:
        assert not mark.exists(), mark.read_text()
        assert "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set" in err
    else:  # the guard works: without the switch zoo probes the Hub, and the probe is what is stopped
        assert mark.exists()


# --------------------------------------------------------------------------- image folder


def test_image_folder_is_checked_again_when_the_image_is_opened(tmp_path):
    from zoocli.eval_runner import _image

    root = tmp_path / "images"
    root.mkdir()
    (root / "inside.png").write_bytes(CUP.read_bytes())
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(secret)
    (root / "pic.png").symlink_to(root / "inside.png")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": 1, "image": "pic.png", "question": "q?", "answer": "a"}) + "\n")
    [sample] = load_samples(q, image_root=root)  # checked: inside
    (root / "pic.png").unlink()
    (root / "pic.png").symlink_to(secret)  # swapped after the check
    with pytest.raises(ZooError, match="outside the image folder") as e:
        _image(None, None, sample)
    assert "\n" not in str(e.value) and "--allow-outside-root" in str(e.value)
    [free] = load_samples(q, image_root=root, allow_outside_root=True)
    assert free.image_root is None


def test_image_open_refuses_a_fifo_swapped_in_after_the_check(tmp_path, monkeypatch):
    import zoocli.images as images

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(images, "_check_regular", lambda p: None)  # as if swapped after it passed
    with pytest.raises(ZooError, match="not a regular file"):
        images.load_image(fifo)  # returns at once: the FIFO is opened non-blocking, then refused


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_is_one_line_exit_143_lock_released_and_records_kept(tmp_path, zoo_model_cache):
    home = tmp_path / "home"
    (home / ".cache" / "zoo").mkdir(parents=True)
    (home / ".cache" / "zoo" / "models").symlink_to(zoo_model_cache)
    q = _question_file(tmp_path, 400)
    out = tmp_path / "run.jsonl"
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "zoocli", "eval", q, "--image-root", IMAGES,
                          "--methods", "divprune", "--budgets", "4", "--batch-size", "1",
                          "--max-new-tokens", "1", "--model", "tiny-llava", "--out", out],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and out.stat().st_size > 0:  # mid-run: records being written
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err[-2000:]
    assert_one_error(err, "terminated")
    assert err.strip().splitlines()[-1] == "error: terminated"
    assert not (tmp_path / "run.jsonl.lock").exists()
    kept = list(read_records(out))  # every finished record is there and readable
    assert kept and len(kept) < 800

"""Issue 11: output files (``zoo eval --out`` / ``zoo bench --out``) are never destroyed, replaced
or appended to when they are not zoo's own; one writer at a time; a full disk is one line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from zoocli.bench import append_row, done_keys as bench_done_keys
from zoocli.errors import ZooError
from zoocli.evaluation import RecordWriter, merge_shards, read_records
from zoocli.outfile import BENCH_KEYS, JsonlOut, _kind, output_lock


def rec(i, method="zoo"):
    return {"dataset": "d", "id": str(i), "method": method, "budget": 64, "score": 1.0}


def bench_row(i):
    return {"method": f"m{i}", "budget": "64", "stage": "pre_llm", "key": {"method": f"m{i}"}}


FOREIGN = {
    "notes.txt": b"my notes, not zoo's",  # one unterminated line: used to be taken for a torn record
    "notes2.txt": b"line one\nline two\n",
    "array.json": b'[{"dataset": "d", "id": "1", "method": "m", "budget": 1}]',
    "other.jsonl": b'{"a": 1}\n{"a": 2}\n',
    "deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "binary.jsonl": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_file_is_refused_and_untouched(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(FOREIGN[name])
    for open_it in (lambda: RecordWriter(p), lambda: append_row(p, bench_row(1)), lambda: bench_done_keys(p)):
        with pytest.raises(ZooError, match="not a zoo JSON Lines file|cannot read --out") as e:
            open_it()
        assert "\n" not in str(e.value) and str(p) in str(e.value)
    assert p.read_bytes() == FOREIGN[name]
    assert not (tmp_path / (name + ".lock")).exists()


def _fifo(tmp_path):
    p = tmp_path / "f.jsonl"
    os.mkfifo(p)
    return p


def test_fifo_directory_socket_are_refused_without_opening(tmp_path):
    import socket

    fifo = _fifo(tmp_path)
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    sock_path = tmp_path / "s.jsonl"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        for p, kind in ((fifo, "FIFO"), (d, "directory"), (sock_path, "socket")):
            for open_it in (lambda: RecordWriter(p), lambda: append_row(p, bench_row(1)),
                            lambda: bench_done_keys(p), lambda: list(read_records(p))):
                with pytest.raises(ZooError, match=kind):  # no hang on the FIFO: it is never opened
                    open_it()
    finally:
        s.close()


def test_device_node_is_refused(tmp_path):
    dev = tmp_path / "null"
    try:  # a fake /dev/null (char device 1:3) inside tmp_path; needs CAP_MKNOD
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    with pytest.raises(ZooError, match="character device"):
        RecordWriter(dev)
    with pytest.raises(ZooError, match="character device"):
        append_row(dev, bench_row(1))
    assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_kind_names_every_file_type():
    assert _kind(stat.S_IFREG) is None
    assert _kind(stat.S_IFBLK) == "a block device" and _kind(stat.S_IFCHR) == "a character device"


def test_symlinked_out_stays_a_symlink(tmp_path):
    target = tmp_path / "real" / "run.jsonl"
    target.parent.mkdir()
    target.write_text(json.dumps(rec(0)) + "\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with RecordWriter(link) as w:
        w.write(rec(1))
    shard = tmp_path / "link.rank0.jsonl"
    with RecordWriter(shard) as w:
        w.write(rec(2))
    assert merge_shards([shard], link) == 3
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [r["id"] for r in read_records(target)] == ["0", "1", "2"]
    append_row(tmp_path / "b.jsonl", bench_row(1))
    (tmp_path / "blink.jsonl").symlink_to(tmp_path / "b.jsonl")
    append_row(tmp_path / "blink.jsonl", bench_row(2))
    assert (tmp_path / "blink.jsonl").is_symlink() and len((tmp_path / "b.jsonl").read_text().splitlines()) == 2


def test_bench_never_appends_after_a_torn_line(tmp_path):
    p = tmp_path / "b.jsonl"
    append_row(p, bench_row(1))
    whole = p.read_text()
    p.write_text(whole + json.dumps(bench_row(2))[:20])  # torn by a crash / full disk
    assert len(bench_done_keys(p)) == 1
    append_row(p, bench_row(3))
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["m1", "m3"]
    # a torn first row is zoo's too (it starts like zoo's rows); a whole row without newline is kept
    p.write_text(json.dumps(bench_row(1))[:15])
    append_row(p, bench_row(2))
    assert [json.loads(x)["method"] for x in p.read_text().splitlines()] == ["m2"]
    p.write_text(json.dumps(bench_row(1)))
    append_row(p, bench_row(2))
    assert [json.loads(x)["method"] for x in p.read_text().splitlines()] == ["m1", "m2"]


def test_second_writer_is_refused_with_the_pid(tmp_path):
    p = tmp_path / "run.jsonl"
    with RecordWriter(p) as w:
        w.write(rec(1))
        assert (tmp_path / "run.jsonl.lock").read_text() == f"zoo output lock\n{os.getpid()}\n"
        code = textwrap.dedent(f"""
            from zoocli.evaluation import RecordWriter
            from zoocli.errors import ZooError
            try:
                RecordWriter({str(p)!r})
            except ZooError as e:
                print(e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.getcwd()).stdout
        assert "in use by another zoo process" in out and f"PID {os.getpid()}" in out and str(p) in out
    assert not (tmp_path / "run.jsonl.lock").exists()
    with RecordWriter(p) as w:  # free again
        w.write(rec(2))


def test_run_long_lock_is_reentrant_in_process(tmp_path):
    p = tmp_path / "run.jsonl"
    with output_lock(p):
        with RecordWriter(p) as w:
            w.write(rec(1))
        assert merge_shards([], p) == 1
        assert (tmp_path / "run.jsonl.lock").exists()
    assert not (tmp_path / "run.jsonl.lock").exists()


def test_disk_full_is_one_line_and_the_next_run_repairs(tmp_path):
    p = tmp_path / "run.jsonl"
    with RecordWriter(p) as w:
        w.write(rec(0))
    size = p.stat().st_size
    # a real EFBIG: the file-size limit lets only part of the next row through
    code = textwrap.dedent(f"""
        import resource, signal
        from zoocli.evaluation import RecordWriter
        from zoocli.errors import ZooError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 20}, resource.RLIM_INFINITY))
        w = RecordWriter({str(p)!r})
        try:
            w.write({rec(1)!r})
        except ZooError as e:
            print("ZooError:", e)
        w.close()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("ZooError:") and "disk full" in line and "\n" not in line and str(p) in line
    assert [r["id"] for r in read_records(p)] == ["0"]  # nothing lost
    p.write_bytes(p.read_bytes() + json.dumps(rec(1)).encode()[:20])  # a torn row left behind
    with RecordWriter(p) as w:
        w.write(rec(2))
    assert [r["id"] for r in read_records(p)] == ["0", "2"]


def test_jsonl_out_checks_key_fields(tmp_path):
    with JsonlOut(tmp_path / "x.jsonl", BENCH_KEYS) as out:
        with pytest.raises(ValueError, match="key field"):
            out.append({"method": "m"})

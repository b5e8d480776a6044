"""The one rule for every file zoo writes, and the writers that follow it.

The rule (``check_target``, used by every writer: ``--out`` of eval and bench, ``--overlay``, the
lmms-eval backend's ``stats=PATH``, the lock files, the torchrun shards): zoo writes only a
*regular* file that is new, empty, or recognisably zoo's own of that kind; never one of the
command's inputs (``zoo score photo.png --overlay photo.png`` is refused, also through a symlink
or a hard link); never a FIFO, device, directory or socket (refused from ``os.stat``, never
opened, so nothing hangs). Whole files (a PNG) are written atomically (``write_atomic``: a
temporary file in the same folder, fsynced, then ``os.replace``); a symlinked output stays a
symlink and its target is what is replaced. zoo's auxiliary files carry a zoo signature
(``LOCK_SIGNATURE``; shards: ``zoocli.evaluation.store.SHARD_FIELD``) and a file without it is
never truncated, merged or deleted.

JSON Lines outputs (``JsonlOut``) are appended to: zoo's own means every complete line is a JSON
object carrying the writer's key fields. Anything else -- ``notes.txt``, a JSON array -- is
refused with one line naming the file. The path is never replaced: a symlinked output stays a
symlink and its target is appended to in place. A torn last line is repaired only when it is
zoo's own (a partial JSON object following zoo rows, or starting the way zoo's rows start): it is
dropped, or ended with a newline when it is a whole record, so nothing is ever appended after an
unterminated line.

Each output is guarded by an advisory lock (``fcntl.flock``, exclusive, non-blocking) on a sidecar
file ``<target>.lock`` next to the real file, holding ``LOCK_SIGNATURE`` and the PID of the
writer; a second writer gets an error naming the file and that PID. A ``<target>.lock`` that is
not zoo's (a user's own file of that name, or not a regular file) is refused in one line and left
exactly as it was. ``output_lock(path)`` holds it for a whole run; the writers here take it
themselves unless this process already holds it. Appends go through ``os.write`` on the raw
descriptor and are fsynced; a full disk (ENOSPC, EFBIG, EDQUOT) is one line, the partial line is
cut off again when possible and otherwise repaired by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from zoocli.errors import ZooError

# ``zoo bench --out`` rows: their key fields, and how ``json.dumps(row)`` starts (``bench._row`` puts "method" first)
BENCH_KEYS = ("key", "method", "budget")
BENCH_HEADS = (b'{"method": ',)
# lmms-eval backend ``stats=PATH`` rows (``lmms_eval_model``): their key fields and how they start
STATS_KEYS = ("task", "doc_id", "kept_tokens", "n_visual_tokens")
STATS_HEADS = (b'{"task": ',)
# the first line of every lock file zoo writes (its PID follows on the second line)
LOCK_SIGNATURE = b"zoo output lock\n"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_HELD: dict[str, int] = {}  # real path of an output -> fd of the lock this process holds on it


def _kind(mode: int) -> str | None:
    """What a non-regular file is (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _err(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _real(path: Path) -> str:
    return os.path.realpath(path)


# --------------------------------------------------------------------------- lock


def _lock_path(path: Path) -> Path:
    real = Path(_real(path))
    return real.with_name(real.name + ".lock")


def _lock_pid(fd: int) -> str:
    """The PID a (signed) lock file holds, for messages."""
    data = os.pread(fd, 64, 0)
    if data.startswith(LOCK_SIGNATURE):
        data = data[len(LOCK_SIGNATURE):]
    pid = data.decode("ascii", "replace").strip()
    return pid if pid.isdigit() else "unknown"


def _acquire(path: Path, what: str) -> int:
    lock = _lock_path(path)
    for _ in range(10):  # retry when the holder removed the lock file between our open and flock
        try:  # an existing lock that is not a regular file (a FIFO, a device) is never opened
            st = os.lstat(lock)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise ZooError(f"{what} {path}: cannot check its lock file {lock} ({_err(e)})") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else _kind(st.st_mode)
            raise _foreign_lock(path, what, lock, f"is {kind}")
        try:  # no O_TRUNC: an existing file is not changed before it is known to be zoo's
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise ZooError(f"{what} {path}: cannot write (cannot create the lock file {lock}: "
                           f"{_err(e)})") from None
        if _kind(os.fstat(fd).st_mode):  # swapped for something else since the lstat
            os.close(fd)
            raise _foreign_lock(path, what, lock, "is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_pid(fd)
            os.close(fd)
            raise ZooError(f"{what} {path} is in use by another zoo process (PID {pid}; lock file "
                           f"{lock}); wait for it to finish or give another file") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        head = os.pread(fd, len(LOCK_SIGNATURE), 0)
        if head and head != LOCK_SIGNATURE:  # a user's own file named <out>.lock: left alone
            os.close(fd)
            raise _foreign_lock(path, what, lock, "exists and is not a zoo lock file")
        os.ftruncate(fd, 0)  # zoo's own lock (empty, or left by a killed run): take it over
        os.pwrite(fd, LOCK_SIGNATURE + f"{os.getpid()}\n".encode(), 0)
        return fd
    raise ZooError(f"{what} {path}: cannot take the lock {lock} (it keeps changing)")


def _foreign_lock(path: Path, what: str, lock: Path, why: str) -> ZooError:
    return ZooError(f"{what} {path}: its lock file {lock} {why}; zoo does not touch it: move it "
                    f"away or give another file name")


@contextlib.contextmanager
def output_lock(path, what: str = "--out") -> Iterator[None]:
    """Hold the advisory lock of output ``path`` (re-entrant within this process)."""
    path = Path(path)
    key = _real(path)
    if key in _HELD:
        yield
        return
    fd = _acquire(path, what)
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        lock = _lock_path(path)
        with contextlib.suppress(OSError):  # only the file this process holds (zoo's own)
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock)
        os.close(fd)


# --------------------------------------------------------------------------- checking


def _loads(line: bytes):
    """A JSON value from one line, or None when it is not valid JSON (any reason: bad UTF-8,
    nesting too deep, an integer over Python's digit limit, ...)."""
    try:
        return json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _is_row(obj, keys: Sequence[str]) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in keys)


def check_regular(path, what: str = "--out") -> bool:
    """True when ``path`` is an existing regular file (after symlinks), False when it does not
    exist; ``ZooError`` naming it when it is a directory, FIFO, device or socket (never opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot check it ({_err(e)})") from None
    kind = _kind(st.st_mode)
    if kind:
        raise ZooError(f"{what} {path} is {kind}, not a regular file; zoo reads and writes only regular files")
    return True


def _same(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_target(path, what: str = "--out", *, inputs: Iterable = (), ours=None,
                 kind: str = "zoo's own file") -> bool:
    """The rule for a file zoo is about to write (see the module docstring): True when ``path``
    exists and may be written, False when it is new. ``ZooError`` (one line naming ``path``) when
    it is not a regular file, when it is one of ``inputs`` (after symlinks and hard links), or
    when it is not empty and ``ours(path)`` does not recognise it as zoo's own ``kind``."""
    if not check_regular(path, what):
        return False
    for src in inputs:
        if src is not None and _same(path, src):
            raise ZooError(f"{what} {path} is the input file {src}; zoo never writes over its "
                           f"input: give another file name")
    try:
        empty = os.stat(path).st_size == 0
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot check it ({_err(e)})") from None
    if not empty and ours is not None and not ours(path):
        raise ZooError(f"{what} {path} already exists and is not {kind}; zoo writes only new, "
                       f"empty or its own files: give another file name")
    return True


def write_atomic(path, data: bytes, what: str = "--out") -> None:
    """Write ``data`` as the whole file ``path``: a temporary file in the same folder, fsynced,
    then ``os.replace`` (a crash leaves the old file or the new one, never half of either). A
    symlink stays a symlink: its target is replaced. The caller checked ``path`` (``check_target``)."""
    real = Path(_real(path))
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot write ({_err(e)})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name[:100]}.", suffix=".zoo-tmp", dir=real.parent)
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot write ({_err(e)})") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        check_regular(real, what)  # swapped for a FIFO or a folder meanwhile: refused, not replaced
        os.replace(tmp, real)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = " (disk full)" if e.errno in DISK_FULL else ""
        raise ZooError(f"{what} {path}: cannot write{full} ({_err(e)}); nothing was changed") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- PNG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_SOFTWARE = "zoo"  # a PNG zoo writes holds the text chunk Software = "zoo <version>"
_PNG_HEAD = 1 << 20  # the signature sits before the image data: this much is read at most


def png_signature():
    """The ``PngInfo`` every PNG zoo writes carries (``Software: zoo <version>``)."""
    from PIL.PngImagePlugin import PngInfo

    import zoocli

    info = PngInfo()
    info.add_text("Software", f"{PNG_SOFTWARE} {zoocli.__version__}")
    return info


def is_zoo_png(path) -> bool:
    """True when ``path`` is a PNG that zoo wrote (``png_signature`` in a text chunk before the
    image data); reads at most 1 MiB of a regular file, never decodes the image."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PNG_HEAD)
    except OSError:
        return False
    if not head.startswith(PNG_MAGIC):
        return False
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(head):
        size = int.from_bytes(head[pos:pos + 4], "big")
        ctype = head[pos + 4:pos + 8]
        body = head[pos + 8:pos + 8 + size]
        if ctype == b"tEXt":
            key, _, value = body.partition(b"\0")
            if key == b"Software" and value.split(b" ")[0] == PNG_SOFTWARE.encode():
                return True
        if ctype in (b"IDAT", b"IEND") or len(body) < size:
            return False
        pos += 12 + size
    return False


def check_png_target(path, what: str = "--overlay", inputs: Iterable = ()) -> bool:
    """``check_target`` for a PNG: new, empty or a PNG zoo wrote (``is_zoo_png``)."""
    return check_target(path, what, inputs=inputs, ours=is_zoo_png, kind="a PNG that zoo wrote")


def save_png(im, path, what: str = "--overlay", inputs: Iterable = ()) -> None:
    """Write image ``im`` as a signed PNG at ``path`` under the rule: new, empty or a PNG zoo
    wrote, never one of ``inputs``; atomically, holding the output's lock."""
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=png_signature())
    check_png_target(path, what, inputs)  # before the lock file is made next to it
    with output_lock(path, what):
        check_png_target(path, what, inputs)
        write_atomic(path, buf.getvalue(), what)


def check_jsonl(path, keys: Sequence[str], heads: Sequence[bytes] = (), what: str = "--out") -> int | None:
    """Check that ``path`` may be appended to (see the module docstring); return the size to cut
    a torn last line back to, ``-1`` when a whole last record only lacks its newline, or None when
    the file ends cleanly (or does not exist). ``ZooError`` naming the file otherwise."""
    path = Path(path)
    if not check_regular(path, what):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot read it ({_err(e)})") from None
    end = data.rfind(b"\n") + 1
    rows = 0
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        if not _is_row(_loads(line), keys):
            raise _not_ours(path, what, n)
        rows += 1
    tail = data[end:]
    if not tail.strip():
        return None if not tail else end
    if _is_row(_loads(tail), keys):
        return -1
    if tail.startswith(b"{") and (rows or any(h.startswith(tail) or tail.startswith(h) for h in heads)):
        return end  # zoo's own row, torn by a crash or a full disk
    raise _not_ours(path, what, data.count(b"\n") + 1)


def _not_ours(path, what, n) -> ZooError:
    return ZooError(f"{what} {path} is not a zoo JSON Lines file (line {n} is not a zoo record); "
                    f"zoo only appends to a new, empty or zoo-written file: give another name")


# --------------------------------------------------------------------------- writing


class JsonlOut:
    """An output file opened for appending zoo rows: checked, locked, its torn tail repaired.

    ``with JsonlOut(path, keys) as out: out.append(row)``. Creates missing parent folders.
    """

    def __init__(self, path, keys: Sequence[str], heads: Sequence[bytes] = (), what: str = "--out",
                 make_parents: bool = True, inputs: Iterable = ()):
        self.path, self.keys, self.what = Path(path), tuple(keys), what
        self._fd, self._lock = -1, None
        check_target(self.path, what, inputs=inputs)  # before the lock file is made next to it
        if not make_parents and not self.path.parent.is_dir():
            raise ZooError(f"{what} {self.path}: cannot write (folder {self.path.parent} does not exist)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ZooError(f"{what} {self.path}: cannot write (cannot create its folder: {_err(e)})") from None
        lock = output_lock(self.path, what)
        lock.__enter__()
        self._lock = lock
        try:
            cut = check_jsonl(self.path, self.keys, heads, what)
            self._fd = self._open()
            if cut == -1:
                self._write(b"\n")
            elif cut is not None:
                os.ftruncate(self._fd, cut)
                self._sync()
        except BaseException:
            self.close()
            raise

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise ZooError(f"{self.what} {self.path}: cannot write ({_err(e)})") from None
        kind = _kind(os.fstat(fd).st_mode)  # swapped for something else since the check
        if kind:
            os.close(fd)
            raise ZooError(f"{self.what} {self.path} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return fd

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise ZooError(f"{self.what} {self.path}: cannot flush to disk ({_err(e)})") from None

    def _write(self, data: bytes) -> None:
        start = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            with contextlib.suppress(OSError):  # take the partial row back out; else the next run does
                os.ftruncate(self._fd, start)
            if e.errno in DISK_FULL:
                raise ZooError(f"{self.what} {self.path}: disk full ({_err(e)}); the rows written so "
                               f"far are kept; free space and rerun to continue") from None
            raise ZooError(f"{self.what} {self.path}: cannot write ({_err(e)})") from None
        self._sync()

    def append(self, row: dict) -> None:
        """Append one row (key fields checked), flushed and fsynced before returning."""
        self.append_many([row])

    def append_many(self, rows: Iterable[dict], sort_keys: bool = False) -> None:
        lines = []
        for row in rows:
            for k in self.keys:
                if k not in row:
                    raise ValueError(f"row lacks the key field '{k}'")
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys) + "\n")
        if lines:
            # a lone surrogate (a non-UTF-8 file name, "\ud800" from a data file) can only sit in a
            # JSON string: written as its \uXXXX escape it is valid JSON and reads back the same
            self._write("".join(lines).encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def __enter__(self) -> JsonlOut:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

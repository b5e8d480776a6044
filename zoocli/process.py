"""The `zoo` process at its edges: its standard streams, Ctrl-C and a reader that goes away.

Imports only the standard library, so the entry point (``zoocli.__main__.run``) can use it before
the CLI (typer, rich, the command modules) is imported.

- A standard stream the shell closed (``zoo methods --json >&-``) is reopened on the null device
  before anything else is opened: otherwise Python gives ``sys.stdout = None`` and, worse, the
  next file zoo opens (an ``--out`` file) takes descriptor 1 and anything written to "stdout"
  would land in it. What would have been printed is discarded; the command still runs.
- Ctrl-C is one line (``error: interrupted``) and exit code 130, also while the CLI is still
  being imported. SIGTERM (``kill``, a scheduler's stop) is handled the same way: it is raised
  in the main thread as ``Terminated`` (a ``KeyboardInterrupt``, so every cleanup that runs for
  Ctrl-C runs for it: output locks released, temporary files removed), then one line
  (``error: terminated``) and exit code 143. A second SIGTERM during that cleanup ends the
  process at once.
- A reader that goes away (``zoo methods | head -1``) ends the process quietly with exit code
  141 (128 + SIGPIPE, what the shell reports for a program killed by the broken pipe).
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT
BROKEN_PIPE = 141  # 128 + SIGPIPE
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like Ctrl-C's ``KeyboardInterrupt``."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM is not caught again
    raise Terminated()


def handle_sigterm() -> None:
    """Turn SIGTERM into ``Terminated`` in this process (call from the main thread, at start)."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave it as it is
        pass


def _null_fd(fd: int) -> None:
    """Make descriptor ``fd`` an open descriptor on the null device."""
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def std_streams() -> None:
    """Reopen a closed descriptor 0, 1 or 2 on the null device (lowest first, so each reopen
    lands on its own number) and give Python stream objects for them where it has None; stdout
    writes what it cannot encode (a lone surrogate from a non-UTF-8 file name) as an escape."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            _null_fd(fd)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, os.fdopen(fd, mode, closefd=False))
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # a file name with bytes that are not UTF-8 prints, escaped
        reconfigure(errors="backslashreplace")


def say(message: str) -> None:
    """One line on stderr without any third-party code (nothing may be imported yet)."""
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr gone too: the exit code still tells
        pass


def interrupted(e: BaseException | None = None) -> None:
    """Ctrl-C: one line, exit code 130; SIGTERM (``e`` a ``Terminated``): one line, 143."""
    if isinstance(e, Terminated):
        say("terminated")
        raise SystemExit(TERMINATED)
    say("interrupted")
    raise SystemExit(INTERRUPTED)


def stdout_gone() -> bool:
    """True when descriptor 1 is a pipe or socket whose reader has gone away (poll says POLLERR
    or POLLHUP), so a ``BrokenPipeError`` from elsewhere (a socket of a process group) is not
    mistaken for it."""
    import select

    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def reader_gone() -> None:
    """stdout's reader went away: silence what is still buffered (its flush at exit would fail
    again), then exit 141 without a message (the reader is gone; stderr may be too)."""
    try:
        _null_fd(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    raise SystemExit(BROKEN_PIPE)

"""Errors the user can cause. The CLI turns each into one line on stderr and an exit code."""


class ZooError(Exception):
    """A failure the user can act on: bad input, missing weights, out of memory. Exit code 1."""

    exit_code = 1


class UsageError(ZooError, ValueError):
    """A malformed command line or option value. Exit code 2. Also a ``ValueError``: a library
    caller who passes a bad argument gets the usual Python error family."""

    exit_code = 2


class UnknownNameError(UsageError, KeyError):
    """An unknown method, model or option name; the message lists the known ones."""

    def __init__(self, kind: str, name: str, known):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} '{name}'; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def is_allocation_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed memory allocation: Python's ``MemoryError``, torch's
    ``OutOfMemoryError`` (CUDA), or the CPU allocator's ``RuntimeError`` ("can't allocate memory")."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "cannot allocate memory" in text)

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


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA) or a
    ``RuntimeError`` of an allocator (``DefaultCPUAllocator: can't allocate memory``)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError)
                                          and any(m in str(e).lower() for m in _OOM_MARKERS))


is_allocation_failure = is_out_of_memory  # the name the loaders use

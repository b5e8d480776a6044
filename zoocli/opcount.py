"""Counting what a call costs on a GPU without a GPU: dispatched ATen ops and host syncs.

Each ATen op a Python loop dispatches is a kernel launch or host work on a GPU (about 5-12 us
each), and each host sync stalls the launch queue; so ``zoo bench-kernel`` counts both instead of
guessing (``OpCounter``, a ``TorchDispatchMode``). Host syncs are the ops that read device data
on the host: ``item`` / ``_local_scalar_dense``, ``nonzero``, ``is_nonzero``, ``equal``, and
copies from a non-CPU tensor to the CPU. A CPU tensor's ``tolist()`` dispatches nothing, so on
CPU tensors a read through it is not seen: the fake-CUDA pipeline tests
(``FakeTensorMode``, which raises on every data-dependent read) cover that.

Ops dispatched from inside Triton's CPU interpreter (its emulation of device memory: storage
copies around a launch) are not counted: on a GPU a launch dispatches no ATen op. Launches of
zoo's own kernels are counted separately (``launches``).
"""

from __future__ import annotations

import sys
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero",
                      "aten.equal", "aten.allclose"})
_INTERPRETER = ("triton", "runtime", "interpreter.py")


def _in_interpreter() -> bool:
    f = sys._getframe(2)
    while f is not None:
        parts = f.f_code.co_filename.replace("\\", "/").split("/")
        if tuple(parts[-3:]) == _INTERPRETER:
            return True
        f = f.f_back
    return False


def _device_to_host(func, args, kwargs) -> bool:
    """A copy whose source is on a device and whose result is on the CPU."""
    name = func._overloadpacket._qualified_op_name.replace("::", ".")
    if name not in ("aten._to_copy", "aten.copy_", "aten.to"):
        return False
    src = args[1] if name == "aten.copy_" else args[0]
    dst = args[0] if name == "aten.copy_" else None
    src_dev = getattr(getattr(src, "device", None), "type", "cpu")
    if dst is not None:
        dst_dev = dst.device.type
    else:
        dst_dev = getattr(kwargs.get("device"), "type", str(kwargs.get("device") or src_dev).split(":")[0])
    return src_dev != "cpu" and dst_dev == "cpu"


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: f()`` -> ``c.ops`` (ATen ops), ``c.syncs`` (host syncs),
    ``c.by_op`` (a Counter by op name), ``c.launches`` (zoo's Triton kernel launches)."""

    active: OpCounter | None = None

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.ops = self.syncs = self.launches = 0

    def __enter__(self):
        OpCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _in_interpreter():
            name = func._overloadpacket._qualified_op_name.replace("::", ".")
            self.by_op[name] += 1
            self.ops += 1
            if name in SYNC_OPS or _device_to_host(func, args, kwargs):
                self.syncs += 1
        return func(*args, **kwargs)


def count_launch() -> None:
    """Called by zoo's kernel launchers: one more launch for the active counter, if any."""
    if OpCounter.active is not None:
        OpCounter.active.launches += 1

"""Fake CUDA for the GPU-correctness tests on a CPU-only machine.

``FakeTensorMode`` makes ``device="cuda"`` tensors without a GPU: no data, but every op checks
its devices (a CPU/CUDA mix raises) and every data-dependent host read (``item``, ``nonzero``,
``tolist``, a copy to the CPU of a value) raises, as a hidden sync would stall a GPU.

One gap of the CPU torch wheel: a few Python-level tensor methods (``__getitem__``,
``__setitem__``, ``contiguous``, ``__invert__``, ...) take a CUDA device guard in C++ before any
mode sees them, and a CPU-only build has none ("not linked with support for cuda devices").
``ShadowGuarded`` runs exactly those (the three named, and any other that fails with that error)
on a same-shape, same-stride meta stand-in (meta has a no-op guard) and returns a
fake CUDA tensor of the result's shape and strides; the devices of their tensor arguments are
checked as CUDA checks them (CUDA or CPU index tensors, CPU 0-dim scalars), so nothing escapes.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

GUARDED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.contiguous}


def _is_cuda(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


def _to_meta(x, base):
    if isinstance(x, torch.Tensor):
        if x.device.type == "cuda" or x is base:
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        if x.device.type == "cpu" and (x.dim() == 0 or x.dtype in (torch.long, torch.int32, torch.bool)):
            return x.to("meta")  # CPU index tensors and 0-dim scalars are fine with CUDA self
        raise RuntimeError(f"Expected all tensors to be on the same device, got {x.device} with cuda")
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v, base) for v in x)
    return x


def _to_cuda(x):
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
    return x


class ShadowGuarded(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GUARDED and args and _is_cuda(args[0]):
            base = args[0]
            if func is torch.Tensor.contiguous:
                mf = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
                return base if base.is_contiguous(memory_format=mf) else base.clone(memory_format=mf)
            return _shadowed(func, args, kwargs, base)
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:  # another Python-level method with a C++ CUDA guard
            if "not linked with support for cuda" not in str(e) or not args or not _is_cuda(args[0]):
                raise
            return _shadowed(func, args, kwargs, args[0])


def _shadowed(func, args, kwargs, base):
    out = func(*_to_meta(list(args), base), **(_to_meta(kwargs, base) if kwargs else {}))
    return _to_cuda(out)


class FakeCuda:
    """``with FakeCuda() as fc:`` fake CUDA mode; ``fc.module(m)`` a fake CUDA copy of a module,
    ``fc.tensor(t)`` of a tensor (integer tensors keep their values: ids and grids drive shapes)."""

    def __init__(self):
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        self.shadow = ShadowGuarded()

    def __enter__(self):
        self.mode.__enter__()
        self.shadow.__enter__()
        return self

    def __exit__(self, *exc):
        self.shadow.__exit__(*exc)
        return self.mode.__exit__(*exc)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype in (torch.long, torch.int32, torch.int64, torch.bool):
            return torch.tensor(t.tolist(), dtype=t.dtype, device="cuda")
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``m`` with every parameter and buffer a fake CUDA tensor (built outside the
        mode from the real module, so call it before entering)."""
        m2 = copy.deepcopy(m)
        with self:
            for mod in m2.modules():
                for k, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[k] = torch.nn.Parameter(
                            torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cuda"),
                            requires_grad=False)
                for k, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[k] = self.tensor(b)
        return m2

    def prepared(self, prepared):
        """A ``Prepared`` with its tensors as fake CUDA tensors (call inside the mode)."""
        inputs = {k: self.tensor(v) if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}
        return dataclasses.replace(prepared, inputs=inputs, question_ids=self.tensor(prepared.question_ids))

    def encoded(self, enc):
        """An ``Encoded`` (from the real CPU model) with its tensors as fake CUDA tensors, for the
        families whose stock vision tower reads its grid metadata on the host (call inside)."""
        def conv(v):
            if isinstance(v, torch.Tensor):
                return self.tensor(v)
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(conv(x) for x in v)
            return v
        # the scopes' layout stays host metadata (fake CPU tensors, as the real ones are on the CPU)
        scopes = [dataclasses.replace(sc, index=self.mode.from_tensor(sc.index),
                                      cells=self.mode.from_tensor(sc.cells)) for sc in enc.scopes]
        return dataclasses.replace(enc, vision=conv(enc.vision), features=conv(enc.features),
                                   state=conv(enc.state), scopes=scopes)
